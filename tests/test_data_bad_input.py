"""Bad input is skipped and counted per reason; the valid samples around it all come through, unchanged."""
from __future__ import annotations

import io
import json
import shutil
import struct
import tarfile
import zlib

import pytest
import torch
from PIL import Image

from tinygpt_v.data import SkipSample, build_processor, build_train_loader, load_image
from tinygpt_v.registry import ConfigError

pytest_plugins = ["conftest_data"]  # fixtures: toy_root, toy_scenes, toy_config

VIS = {"name": "blip2_image_eval", "image_size": 32}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (a decompression bomb) with no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def run_epoch(cfg: dict, valid_count: int):
    """Batches of one: the first `valid_count` are epoch 0's valid samples; one more batch
    makes the loader walk past epoch 0's trailing bad samples (into epoch 1)."""
    loader = build_train_loader(cfg, seed=0)
    batches = [next(loader) for _ in range(valid_count + 1)]
    return loader, batches[:valid_count]


def skipped_exactly(loader, name: str, epoch_size: int, valid_count: int) -> int:
    """Map-style: every sample consumed but not yielded must have been counted as a skip."""
    position = loader.state_dict()["sources"][name]
    consumed = position["epoch"] * epoch_size + position["position"]
    return sum(loader.skip_counts()[name].values()) == consumed - (valid_count + 1)


@pytest.fixture()
def align_with_bad_images(toy_root, tmp_path):
    """A cc_sbu_align folder: four good images and one of each kind of bad input."""
    images = tmp_path / "image"
    images.mkdir()
    good = sorted((toy_root / "cc_sbu_align" / "image").iterdir())[:4]
    for n, path in enumerate(good):
        shutil.copy(path, images / f"good{n}.jpg")
    jpeg = good[0].read_bytes()
    (images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (images / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg " * 20)
    (images / "empty.jpg").write_bytes(b"")
    (images / "bomb.jpg").write_bytes(png_header_only(20_000, 20_000))
    ids = ["good0", "truncated", "good1", "garbage", "empty", "good2", "bomb", "missing", "good3", "empty_caption"]
    shutil.copy(good[1], images / "empty_caption.jpg")
    annotations = [{"image_id": i, "caption": "" if i == "empty_caption" else f"caption of {i}"} for i in ids]
    (tmp_path / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
    return tmp_path


def test_bad_images_are_skipped_and_counted(align_with_bad_images):
    root = align_with_bad_images
    cfg = {"align": {"builder": "cc_sbu_align", "batch_size": 1, "vis_processor": VIS,
                     "ann_path": str(root / "filter_cap.json"), "image_root": str(root / "image")}}
    loader, batches = run_epoch(cfg, valid_count=4)
    assert sorted(b["id"][0] for b in batches) == ["good0", "good1", "good2", "good3"]
    assert set(loader.skip_counts()["align"]) == {"decompression_bomb", "empty_file", "empty_text",
                                                  "missing_image", "truncated_image", "unreadable_image"}
    assert skipped_exactly(loader, "align", epoch_size=10, valid_count=4)
    # valid samples are untouched: the same tensor as processing the file directly
    process = build_processor(VIS)
    for batch in batches:
        direct = process(Image.open(root / "image" / f"{batch['id'][0]}.jpg"))
        assert torch.equal(batch["image"][0], direct)
        assert batch["answer"] == [[f"caption of {batch['id'][0]}"]]
    for _ in range(8):  # training goes on, epoch after epoch, counting the bad ones again
        assert next(loader)["id"][0].startswith("good")
    assert all(count >= 2 for count in loader.skip_counts()["align"].values())


def test_pixel_limit_is_configurable(align_with_bad_images):
    root = align_with_bad_images
    with pytest.raises(SkipSample) as skip:
        load_image(root / "image" / "good0.jpg", max_pixels=100)
    assert skip.value.reason == "decompression_bomb" and "112x112" in skip.value.detail
    cfg = {"align": {"builder": "cc_sbu_align", "batch_size": 1, "vis_processor": VIS, "max_image_pixels": 100,
                     "ann_path": str(root / "filter_cap.json"), "image_root": str(root / "image")}}
    loader = build_train_loader(cfg, seed=0)
    with pytest.raises(RuntimeError, match="in a row were bad"):  # every image over the limit: stop, say why
        next(loader)
    assert loader.skip_counts()["align"]["decompression_bomb"] > 100


def test_malformed_json_lines_and_records_are_skipped(tmp_path):
    good = {"instruction": "x", "instances": [{"instruction_with_input": "Say hi.", "constraints": None, "output": "hi"}]}
    no_output = {"instruction": "x", "instances": [{"instruction_with_input": "Say nothing.", "constraints": None}]}
    lines = [json.dumps(good), '{"instruction": "broken", "instances": [', json.dumps(no_output),
             json.dumps({**good, "instances": [{**good["instances"][0], "output": "bye"}]})]
    (tmp_path / "core_data.jsonl").write_text("\n".join(lines) + "\n")
    cfg = {"unnatural_instruction": {"batch_size": 1, "ann_path": str(tmp_path / "core_data.jsonl")}}
    loader, batches = run_epoch(cfg, valid_count=2)
    assert sorted(b["answer"][0][0] for b in batches) == ["bye", "hi"]
    # the malformed line is counted once, when the file is read; the bad record each time it is drawn
    counts = loader.skip_counts()["unnatural_instruction"]
    assert counts["malformed_json"] == 1 and counts["bad_record"] >= 1 and len(counts) == 2


def test_a_malformed_json_file_is_a_start_up_error(tmp_path):
    (tmp_path / "vqa.json").write_text('[{"question": "q", "answer": ["a"], "image": "x.jpg"},\n  {"question": ]')
    cfg = {"coco_vqa": {"batch_size": 1, "ann_paths": [str(tmp_path / "vqa.json")], "image_root": str(tmp_path)}}
    with pytest.raises(ConfigError, match=r"datasets\.coco_vqa\.ann_paths\[0\]: .*vqa\.json: invalid JSON at line 2"):
        build_train_loader(cfg, seed=0)


def test_a_truncated_shard_keeps_its_earlier_samples(toy_root, tmp_path):
    shutil.copy(toy_root / "laion" / "00000.tar", tmp_path / "00000.tar")
    whole = (toy_root / "laion" / "00001.tar").read_bytes()
    with tarfile.open(toy_root / "laion" / "00001.tar") as tar:
        members = tar.getmembers()
    cut = members[3 * 5].offset_data + 100  # inside the 6th sample's jpg (3 members a sample)
    (tmp_path / "00001.tar").write_bytes(whole[:cut])
    with tarfile.open(tmp_path / "00000.tar") as tar:
        first_shard = {m.name.split(".")[0] for m in tar.getmembers()}
    expected = first_shard | {m.name.split(".")[0] for m in members[:15]}
    # an img2dataset sample whose json caption is corrupt and whose txt is missing
    with tarfile.open(tmp_path / "00002.tar", "w") as tar:
        for name, data in (("bad.jpg", (toy_root / "heldout" / "images").glob("*.jpg").__next__().read_bytes()),
                           ("bad.json", b"{not json")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cfg = {"laion": {"batch_size": 1, "vis_processor": VIS, "shuffle_buffer": 1,
                     "shards": str(tmp_path / "{00000..00002}.tar")}}
    loader, batches = run_epoch(cfg, valid_count=len(expected))
    assert sorted(b["id"][0] for b in batches) == sorted(expected)
    assert set(loader.skip_counts()["laion"]) == {"malformed_json", "truncated_tar"}


def test_resume_does_not_count_replayed_skips_twice(toy_root, tmp_path):
    whole = (toy_root / "laion" / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(whole[: len(whole) // 2])
    cfg = {"laion": {"batch_size": 4, "vis_processor": VIS, "shuffle_buffer": 8, "shards": str(tmp_path / "00000.tar")}}
    loader = build_train_loader(cfg, seed=0)
    for _ in range(3):
        next(loader)
    state = loader.state_dict()
    resumed = build_train_loader(cfg, seed=0)
    resumed.load_state_dict(state)
    assert [next(resumed)["id"] for _ in range(3)] == [next(loader)["id"] for _ in range(3)]
    assert resumed.skip_counts() == loader.skip_counts()
