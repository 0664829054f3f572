"""Two CPU processes (torchrun, gloo) share the samples and give the same summary as one process."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from test_eval_runner import GQA_QUESTIONS, REPLIES, make_gqa

from tinygpt_v.evaluation import EvalSettings, build_benchmarks, evaluate
from tinygpt_v.evaluation.scripted import ScriptedModel

# Each process evaluates with a scripted model and records which prompts it was given.
WORKER = textwrap.dedent("""
    import json, sys
    from tinygpt_v.evaluation import EvalSettings, build_benchmarks, evaluate
    from tinygpt_v.evaluation.runner import process_state
    from tinygpt_v.evaluation.scripted import ScriptedModel

    settings = EvalSettings(**json.loads(sys.argv[1]))
    model = ScriptedModel(json.loads(sys.argv[2]))
    state = process_state()
    evaluate(model, build_benchmarks(settings), settings, state=state, show_progress=False)
    with open(f"{settings.output_dir}/seen{state.process_index}.json", "w") as f:
        json.dump(model.seen, f)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_for(tmp_path: Path, output: str) -> dict:
    return {"benchmarks": make_gqa(tmp_path), "output_dir": str(tmp_path / output), "scoring": "both", "batch_size": 2}


def run_two_workers(tmp_path: Path, output: str) -> Path:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(script), json.dumps(settings_for(tmp_path, output)), json.dumps(REPLIES)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / output


def test_two_processes_give_the_same_summary_as_one(tmp_path):
    one_model = ScriptedModel(REPLIES)
    settings = EvalSettings(**settings_for(tmp_path, "one"))
    one_summary = evaluate(one_model, build_benchmarks(settings), settings, show_progress=False)
    one, two = tmp_path / "one", run_two_workers(tmp_path, "two")

    assert json.loads((two / "summary.json").read_text()) == one_summary
    assert (two / "gqa.jsonl").read_text() == (one / "gqa.jsonl").read_text()
    # The samples were shared: each process saw different prompts, together all of them once.
    seen = [json.loads((two / f"seen{rank}.json").read_text()) for rank in (0, 1)]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(one_model.seen)
    assert len(one_model.seen) == len(GQA_QUESTIONS)
    assert not list(two.glob("gqa.rank*.jsonl"))
