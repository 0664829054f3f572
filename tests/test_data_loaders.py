"""Every loader reads its toy-world files and yields the samples the toy world says it should."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tinygpt_v.config import load_config
from tinygpt_v.data import MapDataset, build_dataset, build_processor, collate, format_box
from tinygpt_v.data.base import sample_rng
from tinygpt_v.data.prompts import load_prompt_file

pytest_plugins = ["conftest_data"]  # fixtures: toy_root, toy_scenes, toy_config

IMAGE = "<ImageHere>"
REPO = Path(__file__).resolve().parents[1]
TOY_CONFIGS = ("toy_pairs.yaml", "toy_align.yaml", "toy_instruct.yaml", "toy_grounding.yaml", "toy_vqa.yaml")


def all_entries(toy_config):
    for name in TOY_CONFIGS:
        yield from toy_config(name).datasets.items()


def every_sample(dataset) -> list[dict]:
    """One epoch of a dataset, in index order (map) or stream order (webdataset)."""
    if isinstance(dataset, MapDataset):
        return [dataset.load(i, sample_rng(0, dataset.name, 0, i)) for i in range(len(dataset))]
    raws = list(dataset.raw_samples(epoch=0, seed=0, rank=0, world_size=1))
    return [dataset.decode(raw, sample_rng(0, dataset.name, 0, i)) for i, raw in enumerate(raws)]


@pytest.fixture(scope="module")
def epochs(toy_config):
    """{entry: (dataset, samples of one epoch)} for every toy config entry."""
    out = {}
    for entry, options in all_entries(toy_config):
        dataset = build_dataset(entry, options)
        out[entry] = (dataset, every_sample(dataset))
    return out


REAL_CONFIGS = sorted(p.name for p in (REPO / "configs" / "datasets").glob("*.yaml") if not p.name.startswith("toy_"))


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_configs_read_the_real_layout(name, toy_root):
    """The toy world uses the real folder layout, so each real config runs on it unchanged."""
    cfg = load_config(REPO / "configs" / "datasets" / name, [f"paths.data={toy_root}"])
    for entry, options in cfg.datasets.items():
        dataset = build_dataset(entry, options)
        sample = every_sample(dataset)[0] if not isinstance(dataset, MapDataset) else \
            dataset.load(0, sample_rng(0, entry, 0, 0))
        size = options.vis_processor.image_size if "vis_processor" in options else None
        assert sample["image"] is None if size is None else sample["image"].shape == (3, size, size)


def test_every_family_is_covered(epochs):
    expected = {"laion", "cc_sbu", "cc_sbu_align", "llava_conversation", "llava_detail", "llava_reason",
                "multitask_conversation", "unnatural_instruction", "refcoco", "refcocop", "refcocog", "invrefcoco",
                "refvg", "flickr_grounded_caption", "flickr_caption_to_phrase", "flickr_object_to_phrase",
                "coco_vqa", "ok_vqa", "aok_vqa", "gqa", "ocrvqa", "textcaps_caption"}
    assert set(epochs) == expected


def test_samples_follow_the_model_contract(epochs):
    for entry, (dataset, samples) in epochs.items():
        assert samples, entry
        assert dataset.skips.as_dict() == {}, entry  # valid toy data: nothing skipped
        for s in samples:
            prompts = s["prompt"] if isinstance(s["prompt"], list) else [s["prompt"]]
            answers = s["answer"] if isinstance(s["answer"], list) else [s["answer"]]
            assert len(prompts) == len(answers) >= 1 and all(a.strip() for a in answers), entry
            assert s["dataset"] == entry and isinstance(s["id"], str)
            if entry == "unnatural_instruction":
                assert s["image"] is None and not any(IMAGE in p for p in prompts)
            else:
                assert s["image"].shape == (3, 112, 112) and s["image"].dtype == torch.float32
                # stages 1-2 (laion, cc_sbu): the image alone, as the original; stage 3-4: tags around it
                first = "<ImageHere>" if entry in ("laion", "cc_sbu") else "<Img><ImageHere></Img>"
                assert prompts[0].startswith(first), (entry, prompts[0])
                assert sum(p.count(IMAGE) for p in prompts) == 1, (entry, prompts)


def test_collate_builds_the_forward_batch(epochs):
    _, conversations = epochs["llava_conversation"]
    batch = collate(conversations[:3])
    assert batch["image"].shape == (3, 3, 112, 112)
    assert [len(p) for p in batch["prompt"]] == [len(a) for a in batch["answer"]] == [3, 3, 3]
    _, texts = epochs["unnatural_instruction"]
    batch = collate(texts[:2])
    assert batch["image"] is None and batch["prompt"] == [[texts[0]["prompt"]], [texts[1]["prompt"]]]
    with pytest.raises(ValueError, match="mixes samples with and without images"):
        collate([conversations[0], texts[0]])


def scene_of(scenes, sample_id: str):
    return scenes[int(re.match(r"\d{6}", sample_id.lstrip("0")).group())]


def caption_of(scene) -> str:
    names = [f"{'an' if s['colour'][0] in 'aeiou' else 'a'} {s['colour']} {s['shape']}" for s in scene["shapes"]]
    return f"{' and '.join(names)} on a {scene['background']} background"


def test_webdataset_pairs_are_image_then_caption(epochs, toy_scenes):
    for entry in ("laion", "cc_sbu"):
        _, samples = epochs[entry]
        assert len(samples) == 48 and len({s["id"] for s in samples}) == 48
        assert all(s["prompt"] == "<ImageHere>" for s in samples)  # no <Img> text, as the original
        expected = {caption_of(s) for s in toy_scenes.values() if s["image_id"] < 200000}
        assert {s["answer"] for s in samples} <= expected


def test_alignment_prompts_come_from_the_shipped_file(epochs, toy_scenes):
    templates = load_prompt_file(None)
    _, samples = epochs["cc_sbu_align"]
    assert {s["prompt"] for s in samples} <= set(templates) and len({s["prompt"] for s in samples}) > 1
    s = samples[0]
    assert s["answer"].startswith("The image shows " + caption_of(toy_scenes[int(s["id"])]).split(" on a ")[0][:6])


def test_llava_and_multitask_answers_are_the_json_turns(epochs, toy_root):
    records = json.loads((toy_root / "llava" / "conversation_58k.json").read_text())
    _, samples = epochs["llava_conversation"]
    for record, sample in zip(records, samples):
        assert sample["answer"] == [t["value"] for t in record["conversations"][1::2]]
        # the original's multitask_conversation.py: tag and newlines out, stripped, a trailing space
        first = record["conversations"][0]["value"].replace("<image>", "").replace("\n", "").strip()
        assert sample["prompt"][0] == f"<Img><ImageHere></Img> {first} "
        assert sample["prompt"][1:] == [t["value"] + " " for t in record["conversations"][2::2]]
    records = json.loads((toy_root / "llava" / "detail_23k.json").read_text())
    _, samples = epochs["llava_detail"]
    assert [s["answer"] for s in samples] == [r["conversations"][1]["value"] for r in records]


def test_unnatural_instructions_are_text_only(epochs):
    _, samples = epochs["unnatural_instruction"]
    spelled = [s for s in samples if s["prompt"].startswith("Spell the word backwards.")]
    assert spelled and all(s["answer"] == s["prompt"].split("Word: ")[1].split()[0][::-1] for s in spelled)
    assert all("Answer in lower case." in s["prompt"] for s in spelled)  # constraints appended


def shape_box(toy_scenes, image_id, colour, shape):
    for s in toy_scenes[image_id]["shapes"]:
        if s["colour"] == colour and s["shape"] == shape:
            return format_box(s["box"], 112, 112)
    raise AssertionError(f"no {colour} {shape} in {image_id}")


def test_refcoco_boxes_match_the_scene(epochs, toy_root):
    instances = json.loads((toy_root / "refcoco" / "refcoco" / "instances.json").read_text())
    boxes = {a["id"]: a["bbox"] for a in instances["annotations"]}
    _, samples = epochs["refcoco"]
    for s in samples:
        x, y, w, h = boxes[int(s["id"])]
        assert s["answer"] == format_box((x, y, x + w, y + h), 112, 112)
        assert s["prompt"].startswith("<Img><ImageHere></Img> [refer] ")
    _, inverse = epochs["invrefcoco"]
    for s in inverse:
        x, y, w, h = boxes[int(s["id"])]
        assert format_box((x, y, x + w, y + h), 112, 112) in s["prompt"] and "[identify]" in s["prompt"]
        assert not s["answer"].startswith("{<")
    assert re.fullmatch(r"\{<\d+><\d+><\d+><\d+>\}", samples[0]["answer"])


def test_flickr_and_visual_genome_boxes_match_the_scene(epochs, toy_scenes):
    phrase = re.compile(r"<p>an? (\w+) (\w+)</p> (\{<\d+><\d+><\d+><\d+>\})")
    for entry in ("flickr_grounded_caption", "flickr_caption_to_phrase", "flickr_object_to_phrase"):
        _, samples = epochs[entry]
        for s in samples:
            found = phrase.findall(s["answer"])
            assert found, (entry, s["answer"])
            assert all(box == shape_box(toy_scenes, int(s["id"]), c, k) for c, k, box in found)
    _, grounded = epochs["flickr_grounded_caption"]
    assert all("[grounding]" in s["prompt"] for s in grounded)
    _, regions = epochs["refvg"]
    for s in regions:
        colour, shape = _refvg_phrase(s["prompt"])
        assert s["answer"] == shape_box(toy_scenes, int(s["id"]) // 10, colour, shape)


def _refvg_phrase(prompt: str) -> tuple[str, str]:
    words = re.findall(r"\b(red|green|blue|yellow|purple|orange) (circle|square|triangle)\b", prompt)
    assert len(words) == 1, prompt
    return words[0]


def test_vqa_family_answers(epochs, toy_root):
    records = json.loads((toy_root / "vqav2" / "vqa_train.json").read_text())
    _, samples = epochs["coco_vqa"]
    assert [s["answer"] for s in samples] == [r["answer"][0] for r in records]
    assert all(s["prompt"].startswith("<Img><ImageHere></Img> [vqa] ") for s in samples)
    assert all(r["question"] in s["prompt"] for r, s in zip(records, samples))
    aok = json.loads((toy_root / "aokvqa" / "aokvqa_v1p0_train.json").read_text())
    assert [s["answer"] for s in epochs["aok_vqa"][1]] == [r["direct_answers"][0] for r in aok]
    books = json.loads((toy_root / "ocrvqa" / "dataset.json").read_text())
    train_questions = sum(len(b["questions"]) for b in books.values() if b["split"] == 1)
    assert len(epochs["ocrvqa"][1]) == train_questions < 2 * len(books)  # split 1 only
    titles = {b["title"] for b in books.values()}
    assert any(s["answer"] in titles for s in epochs["ocrvqa"][1])
    caps = json.loads((toy_root / "textcaps" / "TextCaps_0.1_train.json").read_text())["data"]
    clean = build_processor({"name": "blip_caption"})
    assert [s["answer"] for s in epochs["textcaps_caption"][1]] == [clean(c["caption_str"]) for c in caps]


def test_vqa_answer_is_drawn_by_annotator_share():
    from tinygpt_v.data.vqa import pick_answer
    draws = [pick_answer(["cat"] * 7 + ["dog"] * 3, sample_rng(0, "x", 0, i)) for i in range(2000)]
    assert abs(draws.count("cat") / 2000 - 0.7) < 0.04
    assert pick_answer("yes", sample_rng(0, "x", 0, 0)) == "yes"


def test_heldout_questions_need_the_image(toy_root, toy_scenes):
    meta = json.loads((toy_root / "README.json").read_text())
    heldout = json.loads((toy_root / "heldout" / "vqa_heldout.json").read_text())
    assert meta["chance_accuracy"] == pytest.approx(1 / 6, abs=1e-3)
    assert meta["blind_baseline_accuracy"] < 0.34  # knowing the question alone does not help much
    train_ids = {i for i in toy_scenes if i < 900000}
    for record in heldout:
        image_id = int(record["image"].split("/")[1].split(".")[0])
        assert image_id not in train_ids and (toy_root / "heldout" / record["image"]).is_file()
        shape = record["question"].split("the ")[1].rstrip("?")
        assert [s["colour"] for s in toy_scenes[image_id]["shapes"] if s["shape"] == shape] == [record["answer"][0]]


def test_toy_world_is_deterministic_and_fast(tmp_path):
    from tinygpt_v.data.toy_world import make_toy_world
    a = make_toy_world(str(tmp_path / "a"), seed=3, n_train=12, n_heldout=4)
    make_toy_world(str(tmp_path / "b"), seed=3, n_train=12, n_heldout=4)
    assert a["seconds"] < 5
    for name in ("vqav2/vqa_train.json", "scenes.json", "laion/00000.tar", "coco/train2014/COCO_train2014_000000100003.jpg"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    c = make_toy_world(str(tmp_path / "c"), seed=4, n_train=12, n_heldout=4)
    assert c["records"] and (tmp_path / "c" / "scenes.json").read_bytes() != (tmp_path / "a" / "scenes.json").read_bytes()


def load_script(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, REPO / "dataset" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_vqa_makes_what_coco_vqa_reads(toy_root, tmp_path):
    questions = {"questions": [{"image_id": 100001, "question": "what colour is the square?", "question_id": 7}]}
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i} for i, a in enumerate(["green"] * 9 + ["lime"])]
    annotations = {"annotations": [{"question_id": 7, "image_id": 100001, "answers": answers}]}
    for name, data in (("q.json", questions), ("a.json", annotations)):
        (tmp_path / name).write_text(json.dumps(data))
    out = tmp_path / "vqa_train.json"
    load_script("convert_vqa").main(["--questions", str(tmp_path / "q.json"), "--annotations", str(tmp_path / "a.json"),
                                     "--out", str(out)])
    record = json.loads(out.read_text())[0]
    assert record["image"] == "train2014/COCO_train2014_000000100001.jpg" and record["answer"].count("green") == 9
    dataset = build_dataset("coco_vqa", {"batch_size": 1, "ann_paths": [str(out)], "image_root": str(toy_root / "coco")})
    assert dataset.load(0, sample_rng(0, "coco_vqa", 0, 0))["answer"] in {"green", "lime"}


def test_convert_blip_json_writes_an_img2dataset_tsv(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps([{"url": "http://x/1.jpg", "caption": "a dog\twith\na hat"}]))
    load_script("convert_blip_json").main([str(tmp_path / "c.json"), str(tmp_path / "c.tsv")])
    assert (tmp_path / "c.tsv").read_text().splitlines() == ["url\tcaption", "http://x/1.jpg\ta dog with a hat"]


def test_prompt_files_need_one_image_placeholder(tmp_path):
    from tinygpt_v.registry import ConfigError
    (tmp_path / "p.txt").write_text("<Img><ImageHere></Img> Describe it.\nNo image here.\n")
    with pytest.raises(ConfigError, match=r"p\.txt: prompt 2 must contain <ImageHere> exactly once"):
        load_prompt_file(str(tmp_path / "p.txt"))


def test_prompt_files_skip_comment_lines_and_keep_templates_as_written(tmp_path):
    (tmp_path / "p.txt").write_text("# where these come from\n\n<Img><ImageHere></Img> Describe it. \n"
                                    "###Human: <Img><ImageHere></Img> Go on.\n")
    assert load_prompt_file(str(tmp_path / "p.txt")) == [  # the original reads lines with splitlines()
        "<Img><ImageHere></Img> Describe it. ", "###Human: <Img><ImageHere></Img> Go on."]


def test_shipped_alignment_prompts_are_minigpt4s_four():
    assert load_prompt_file(None) == [
        "<Img><ImageHere></Img> Describe this image in detail.",
        "<Img><ImageHere></Img> Take a look at this image and describe what you notice.",
        "<Img><ImageHere></Img> Please provide a detailed description of the picture.",
        "<Img><ImageHere></Img> Could you describe the contents of this image for me?"]
