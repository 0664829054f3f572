"""eval.py on the real (tiny) model: the demo config, a checkpoint of trainable weights, the toy
world's held-out questions. The model is untrained here, so the test checks that evaluation
reproduces the model's own answers from the checkpoint, not how good they are."""
import json
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed

import eval as eval_script
from tinygpt_v.checkpoints import save_trainable
from tinygpt_v.config import load_config
from tinygpt_v.data.toy_world import make_toy_world
from tinygpt_v.evaluation.images import image_transform, load_image
from tinygpt_v.models import build_model

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "eval_configs" / "demo.yaml"


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    make_toy_world(str(root), n_train=3, n_heldout=3)
    return root


def trained_looking_model(seed: int):
    """The tiny model as the demo builds it, with its trainable weights moved away from their init
    (so a checkpoint that failed to load would show)."""
    set_seed(seed)
    model = build_model(load_config(DEMO, validate=False).model, verbose=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_demo_evaluation_reproduces_the_checkpointed_model(toy_world, tmp_path, capsys):
    model = trained_looking_model(seed=42)
    checkpoint = save_trainable(model, tmp_path / "checkpoint" / "model.safetensors")
    options = [f"evaluation.data_root={toy_world}", f"evaluation.output_dir={tmp_path / 'out'}",
               f"evaluation.checkpoint={checkpoint}"]
    assert eval_script.main(["--cfg-path", str(DEMO), "--options", *options]) == 0
    assert "| toy_vqa | accuracy |" in capsys.readouterr().out

    rows = [json.loads(line) for line in (tmp_path / "out" / "toy_vqa.jsonl").read_text().splitlines()]
    heldout = json.loads((toy_world / "heldout" / "vqa_heldout.json").read_text())
    assert [r["id"] for r in rows] == [str(q["question_id"]) for q in heldout]
    assert rows[0]["prompt"] == f"<Img><ImageHere></Img> [vqa] {heldout[0]['question']}"
    # The same answers as the model that wrote the checkpoint, asked directly.
    transform = image_transform(112)
    images = torch.stack([load_image(str(toy_world / "heldout" / q["image"]), transform) for q in heldout])
    expected = model.generate(images, [r["prompt"] for r in rows], max_new_tokens=5)
    assert [r["prediction"] for r in rows] == expected

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["benchmarks"]["toy_vqa"]["samples"] == len(heldout)
    # Re-running finds every prediction done and gives the same summary.
    assert eval_script.main(["--cfg-path", str(DEMO), "--options", *options]) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
