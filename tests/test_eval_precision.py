"""eval.py in half precision on the CPU: the tiny model (with a Q-Former) answers the toy
questions in bf16 and fp16. Before the fix, loading cast ln_vision to half while encode_image fed
it fp32 tokens: "RuntimeError: mixed dtype (CPU)" on the first batch."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import eval as eval_script
from tinygpt_v.config import load_config
from tinygpt_v.evaluation import settings_from_config
from tinygpt_v.evaluation.loading import load_model

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [{"question_id": 1, "question": "What colour is the square?", "image": "a.png", "answer": ["red"] * 10},
             {"question_id": 2, "question": "What shape is it?", "image": "b.png", "answer": ["circle"] * 10}]


def write_suite(root: Path, precision: str) -> Path:
    (root / "questions.json").write_text(json.dumps(QUESTIONS))
    for color, q in zip([(200, 30, 30), (30, 30, 200)], QUESTIONS):
        Image.new("RGB", (20, 16), color).save(root / q["image"])
    config = root / "eval.yaml"
    config.write_text(f"""defaults:
  - {REPO / 'configs' / 'models' / 'tiny.yaml'}
evaluation:
  output_dir: {root / 'out'}
  precision: {precision}
  scoring: official,evalai,original
  batch_size: 2
  max_new_tokens: 4
  benchmarks:
    toy: {{name: lavis_vqa, annotations: {root / 'questions.json'}, image_root: {root}}}
""")
    return config


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_evaluation_on_cpu_answers(tmp_path, precision, dtype):
    config = write_suite(tmp_path, precision)
    cfg = load_config(config)
    model = load_model(cfg, settings_from_config(cfg), torch.device("cpu"))
    # The original's layout: LLM and the vision tower's matmuls in half, ln_vision / Q-Former /
    # projection fp32.
    assert model.llm.get_input_embeddings().weight.dtype == dtype
    linear_dtypes = {m.weight.dtype for m in model.vision.modules() if isinstance(m, torch.nn.Linear)}
    assert linear_dtypes == {dtype}
    for part in (model.ln_vision, model.qformer, model.connector):
        assert {p.dtype for p in part.parameters()} == {torch.float32}

    assert eval_script.main(["--cfg-path", str(config)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "toy.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["1", "2"]
    assert all(isinstance(r["prediction"], str) for r in rows)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["benchmarks"]["toy"]) == {"samples", "official", "evalai", "original"}
