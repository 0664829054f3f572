"""Issue 20, "first hour as a new user": one test per point (the demo's reproducibility and the
README figures are recorded in docs/transcripts/demo_runs.md).

Fast on purpose: no model is trained; a fake checkpoint folder (meta.json only) stands for a
trainer checkpoint wherever only its recorded model section matters."""
from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def tiny_section(**changes) -> dict:
    section = OmegaConf.to_container(OmegaConf.load(REPO / "configs/models/tiny.yaml").model, resolve=True)
    section.update(changes)
    return section


def fake_checkpoint(folder: Path, model_section: dict) -> Path:
    """A trainer checkpoint folder as far as the model check reads it: meta.json's config.model."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").write_text(json.dumps({"step": 1, "epoch": 0, "config": {"model": model_section}}))
    return folder


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# --- 1. trackers on only when installed or asked for -------------------------------------------------

def test_a_default_tracker_that_is_not_installed_is_skipped_silently(monkeypatch, caplog):
    from tinygpt_v.training import tracking
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with caplog.at_level(logging.WARNING):
        assert tracking.tracker_names(SimpleNamespace(wandb=None, tensorboard=None)) == []
        assert tracking.tracker_names(SimpleNamespace(wandb=False, tensorboard=None)) == []
    assert not [r for r in caplog.records if r.name.startswith("tinygpt_v")]


def test_an_asked_for_tracker_that_is_missing_is_warned_about(monkeypatch, caplog):
    from tinygpt_v.training import tracking
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with caplog.at_level(logging.WARNING):
        assert tracking.tracker_names(SimpleNamespace(wandb=False, tensorboard=True)) == []
    assert "run.tensorboard is on but tensorboard is not installed" in caplog.text


def test_an_installed_tracker_is_on_by_default_and_off_when_false(monkeypatch):
    from tinygpt_v.training import tracking
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: object())
    assert tracking.tracker_names(SimpleNamespace(wandb=None, tensorboard=None)) == ["wandb", "tensorboard"]
    assert tracking.tracker_names(SimpleNamespace(wandb=False, tensorboard=False)) == []


def test_the_demo_configs_leave_tensorboard_to_the_default():
    from tinygpt_v.config import load_config
    from tinygpt_v.training.settings import run_schema
    import inspect
    assert inspect.signature(run_schema).parameters["tensorboard"].default is None
    for stage in sorted((REPO / "train_configs").glob("demo_stage*.yaml")):
        cfg = load_config(stage, validate=False)
        assert cfg.run.get("tensorboard") is None, stage


# --- 3. one line and a non-zero exit in eval.py and the chat ---------------------------------------------

def eval_config(tmp_path: Path, checkpoint: str | None, with_model: bool = True) -> Path:
    lines = (["defaults: [models/tiny.yaml]", "model: {qformer: null}"] if with_model else []) + [
        "evaluation:", f"  output_dir: {tmp_path / 'out'}", f"  checkpoint: {checkpoint or 'null'}",
        "  benchmarks: {}"]
    path = tmp_path / "eval.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_eval(argv, capsys):
    import eval as eval_script
    status = eval_script.main(argv)
    return status, capsys.readouterr().err


def test_eval_a_corrupt_checkpoint_is_one_line_and_status_1(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    status, err = run_eval(["--cfg-path", str(eval_config(tmp_path, str(bad)))], capsys)
    assert status == 1
    assert "bad.pth" in one_line(err) and one_line(err).startswith("error: ")


def test_eval_without_a_model_section_is_one_line_and_status_2(tmp_path, capsys):
    status, err = run_eval(["--cfg-path", str(eval_config(tmp_path, None, with_model=False))], capsys)
    assert status == 2
    assert "model" in one_line(err) and "Traceback" not in err


def test_eval_a_missing_data_folder_is_one_line_and_status_2(tmp_path, capsys):
    status, err = run_eval(["--cfg-path", str(REPO / "eval_configs/demo.yaml"), "--options",
                            f"evaluation.data_root={tmp_path / 'absent'}", "evaluation.checkpoint=null",
                            f"evaluation.output_dir={tmp_path / 'out'}"], capsys)
    assert status == 2
    assert "absent" in one_line(err)


def test_eval_a_full_disk_is_one_line_and_status_1(tmp_path, capsys, monkeypatch):
    import tinygpt_v.evaluation as evaluation

    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "summary.json"))
    monkeypatch.setattr(evaluation, "run_evaluation", full)
    status, err = run_eval(["--cfg-path", str(eval_config(tmp_path, None))], capsys)
    assert status == 1
    assert "the disk is full while writing" in one_line(err) and "summary.json" in err


def test_eval_a_model_section_that_does_not_match_the_checkpoint_is_refused(tmp_path, capsys):
    checkpoint = fake_checkpoint(tmp_path / "checkpoint_final", tiny_section(qformer=None))
    config = tmp_path / "tiny_with_qformer.yaml"  # tiny.yaml as is: with a Q-Former the checkpoint never had
    config.write_text(f"defaults: [models/tiny.yaml]\nevaluation:\n  output_dir: {tmp_path / 'out'}\n"
                      f"  checkpoint: {checkpoint}\n  benchmarks: {{}}\n")
    status, err = run_eval(["--cfg-path", str(config)], capsys)
    assert status == 1
    line = one_line(err)
    assert "does not match" in line and "model.qformer" in line and "checkpoint_final" in line


def run_chat(argv, capsys):
    from tinygpt_v import chat
    status = chat.main(argv)
    return status, capsys.readouterr()


def test_chat_a_corrupt_checkpoint_is_one_line_and_status_1(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    status, out = run_chat(["--cfg-path", str(REPO / "eval_configs/chat_tiny.yaml"), "--checkpoint", str(bad)],
                           capsys)
    assert status == 1
    assert "bad.safetensors" in one_line(out.err)


def test_chat_without_any_model_is_one_line_and_status_2(tmp_path, capsys):
    config = tmp_path / "only_inference.yaml"
    config.write_text("inference: {device: cpu}\n")
    status, out = run_chat(["--cfg-path", str(config)], capsys)
    assert status == 2
    assert "no model section" in one_line(out.err) and "Missing key" not in out.err
    status, out = run_chat([], capsys)
    assert status == 2 and "--checkpoint" in one_line(out.err)


def test_chat_batch_on_a_full_disk_is_one_line_and_status_1(tmp_path, capsys, monkeypatch):
    from tinygpt_v import chat

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "answers.jsonl"))
    monkeypatch.setattr(chat, "load_chat_config", lambda *a: (object(), object()))
    monkeypatch.setattr(chat, "run_batch", full)
    status, out = run_chat(["--checkpoint", "x", "--batch", "q.jsonl"], capsys)
    assert status == 1
    assert "disk is full" in one_line(out.err)


def test_chat_a_mismatched_model_section_is_refused(tmp_path, capsys):
    checkpoint = fake_checkpoint(tmp_path / "checkpoint_final", tiny_section(qformer=None))
    status, out = run_chat(["--cfg-path", str(REPO / "eval_configs/chat_tiny.yaml"), "--checkpoint",
                            str(checkpoint)], capsys)
    assert status == 1
    assert "model.qformer" in one_line(out.err)


def test_web_demo_start_up_failures_are_one_line(tmp_path, capsys):
    from tinygpt_v.inference import web_demo
    assert web_demo.main([]) == 2
    assert "--checkpoint" in one_line(capsys.readouterr().err)
    missing = tmp_path / "absent_folder"
    assert web_demo.main(["--checkpoint", str(missing)]) == 2
    assert "absent_folder" in one_line(capsys.readouterr().err)


# --- 4. includes from a config kept anywhere ------------------------------------------------------------

def test_a_config_outside_the_repo_includes_the_shipped_presets(tmp_path, monkeypatch):
    from tinygpt_v.config import load_config
    exp = tmp_path / "home" / "exp"
    exp.mkdir(parents=True)
    (exp / "my.yaml").write_text("defaults: [models/tiny.yaml]\nmodel: {qformer: null}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(exp / "my.yaml", validate=False)
    assert cfg.model.qformer is None and cfg.model.llm.model_type == "phi"


def test_includes_are_looked_up_in_the_current_folders_configs(tmp_path, monkeypatch):
    from tinygpt_v import config
    (tmp_path / "work" / "configs" / "models").mkdir(parents=True)
    (tmp_path / "work" / "configs" / "models" / "mine.yaml").write_text("model: {end_sym: '@@'}\n")
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "my.yaml").write_text("defaults: [models/mine.yaml]\n")
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setattr(config, "shipped_roots", lambda: [])
    assert config.load_config(tmp_path / "exp" / "my.yaml", validate=False).model.end_sym == "@@"


def installed_like(tmp_path: Path) -> Path:
    """<prefix>/share/tinygpt_v as pyproject's data-files lay it out after `pip install .`."""
    share = tmp_path / "prefix" / "share" / "tinygpt_v"
    data_files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    for target, patterns in data_files.items():
        folder = tmp_path / "prefix" / target
        folder.mkdir(parents=True, exist_ok=True)
        for pattern in patterns:
            for file in REPO.glob(pattern):
                (folder / file.name).write_bytes(file.read_bytes())
    return share


def test_includes_and_cfg_path_resolve_from_an_installed_layout(tmp_path, monkeypatch):
    from tinygpt_v import config
    share = installed_like(tmp_path)
    monkeypatch.setattr(config, "shipped_roots", lambda: [share])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (elsewhere / "my.yaml").write_text("defaults: [models/tinygpt_v.yaml]\n")
    cfg = config.load_config("my.yaml", validate=False)
    assert cfg.model.llm.pretrained == "microsoft/phi-2"
    assert config.resolve_config_path("eval_configs/chat_demo.yaml") == share / "eval_configs/chat_demo.yaml"
    stage = config.load_config(config.resolve_config_path("train_configs/demo_stage2.yaml"), validate=False)
    assert stage.run.job_name == "demo_stage2" and stage.model.qformer is None  # its defaults resolved too


def test_a_missing_include_names_every_place_looked(tmp_path, monkeypatch):
    from tinygpt_v import config
    from tinygpt_v.registry import ConfigError
    share = tmp_path / "prefix" / "share" / "tinygpt_v"
    monkeypatch.setattr(config, "shipped_roots", lambda: [share])
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "my.yaml").write_text("defaults: [models/absent.yaml]\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        config.load_config(tmp_path / "exp" / "my.yaml")
    message = str(error.value)
    for folder in (tmp_path / "exp" / "models", tmp_path / "exp" / "configs" / "models",
                   tmp_path / "configs" / "models", share / "configs" / "models"):
        assert str(folder) in message
    assert "my.yaml" in message


def test_the_prompt_files_ship_as_package_data():
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "prompts/*.txt" in package_data["tinygpt_v"]
    from importlib import resources
    assert "<ImageHere>" in resources.files("tinygpt_v").joinpath("prompts", "alignment.txt").read_text()


# --- 5. entry points from another folder -----------------------------------------------------------------

def test_the_console_scripts_name_callable_mains():
    import importlib
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"tinygpt-v-train", "tinygpt-v-eval", "tinygpt-v-chat"} <= set(scripts)
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function))


def test_the_train_entry_module_runs_with_the_cwd_elsewhere(tmp_path):
    """From an empty folder, `python -m tinygpt_v.cli.train --cfg-path train_configs/stage1.yaml`
    finds the shipped stage config and its includes, and stops at the first real problem (the
    pretrained weights are not here) with one line."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "tinygpt_v.cli.train", "--cfg-path", "train_configs/stage1.yaml"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert line.startswith("config error: model.") and "configs/models/tinygpt_v.yaml" in line


def test_the_demo_pipeline_loads_from_another_folder(tmp_path, monkeypatch):
    from tinygpt_v.cli.train import load_pipeline
    from tinygpt_v.config import resolve_config_path
    monkeypatch.chdir(tmp_path)
    cfg = load_pipeline(resolve_config_path("train_configs/demo.yaml"))
    stages = [Path(stage) for stage in cfg.pipeline.stages]
    assert [s.name for s in stages] == [f"demo_stage{n}.yaml" for n in range(1, 5)]
    assert all(s.is_file() for s in stages)


# --- 6. the model section against the checkpoint's ---------------------------------------------------------

def test_model_differences_name_the_architecture_keys_only(tmp_path):
    from tinygpt_v.evaluation.loading import check_model_matches, model_differences
    recorded = tiny_section(qformer=None)
    wanted = tiny_section(qformer=None, trainable=["lora"], prompt_template="[INST] {} [/INST] ")
    wanted["llm"] = {**wanted["llm"], "config": {**wanted["llm"]["config"], "hidden_size": 128}}
    differences = model_differences(wanted, recorded)
    assert differences == ["model.llm.config.hidden_size: config 128, checkpoint 64"]
    check_model_matches(tiny_section(qformer=None, trainable=["lora"]),
                        fake_checkpoint(tmp_path / "ok", recorded))  # no error


def test_chat_takes_the_model_from_a_checkpoint_alone(tmp_path):
    from tinygpt_v.inference.loading import model_from_checkpoint
    from tinygpt_v.registry import ConfigError
    section = tiny_section(qformer=None, ckpt="output/demo/stage3/checkpoint_final")
    assert model_from_checkpoint(fake_checkpoint(tmp_path / "ckpt", section)) == \
        {k: v for k, v in section.items() if k != "ckpt"}
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.yaml").write_text("model: {}\n")
    assert model_from_checkpoint(export) == export
    with pytest.raises(ConfigError, match="no model section"):
        model_from_checkpoint(tmp_path / "nothing.pth")


# --- 7. terminal chat and web demo ---------------------------------------------------------------------------

class FakeChat:
    def __init__(self):
        self.image, self.questions = None, []
        self.dropped_turns = 0

    has_image = property(lambda self: self.image is not None)

    def upload_image(self, path):
        self.image, self.questions = path, []

    def clear_history(self):
        self.questions = []

    def prompt_for(self, question):
        return question

    def ask_stream(self, question):
        self.questions.append(question)
        yield f"answer {len(self.questions)}"


def test_reset_keeps_the_image_and_a_question_without_one_gets_a_hint():
    import io

    from tinygpt_v.chat import run_terminal
    chat, out = FakeChat(), io.StringIO()
    run_terminal(chat, ["what?", "/image a.jpg", "first", "/reset", "second"], out)
    text = out.getvalue()
    assert "(no image: answering without one; attach one with /image PATH)" in text
    assert "(conversation reset; the image stays)" in text
    assert chat.image == "a.jpg" and chat.questions == ["second"]
    assert text.count("no image") == 1  # after /reset the question is about the kept image


def test_chat_clear_history_keeps_the_pixels(tiny_model):
    from tinygpt_v.inference import Chat
    chat = Chat(tiny_model, template="stage4")
    chat.upload_image(torch.zeros(3, 112, 112))
    chat.questions, chat.answers = ["q"], ["a"]
    chat.clear_history()
    assert chat.has_image and chat.history == []
    chat.reset()
    assert not chat.has_image


PTY_CHAT = """
import sys
sys.path.insert(0, {repo!r})
from tinygpt_v.chat import _input_lines, run_terminal
class Echo:
    has_image, dropped_turns = True, 0
    def prompt_for(self, q): return q
    def ask_stream(self, q): yield "[" + q + "]"
run_terminal(Echo(), _input_lines(), sys.stdout)
print("CLEAN EXIT")
"""


def _controlling_terminal() -> None:
    """In the child: a new session whose controlling terminal is the pty on stdin, so that a
    typed Ctrl-C becomes SIGINT as in a real terminal."""
    import fcntl
    import termios
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def pty_session(keys: list[bytes], tmp_path: Path) -> tuple[str, str, int]:
    """Run the terminal chat loop (an echoing model) on a pseudo-terminal, typing `keys` one
    chunk at a time; returns (what the terminal showed, stderr, exit status)."""
    import pty
    import select
    leader, follower = pty.openpty()
    err = tmp_path / "stderr.txt"
    with err.open("w") as err_file:
        process = subprocess.Popen([sys.executable, "-c", PTY_CHAT.format(repo=str(REPO))], stdin=follower,
                                   stdout=follower, stderr=err_file, env={**os.environ, "TERM": "xterm"},
                                   preexec_fn=_controlling_terminal)
        os.close(follower)
        shown = b""

        def read_for(seconds: float) -> bytes:
            data, end = b"", time.monotonic() + seconds
            while time.monotonic() < end:
                ready, _, _ = select.select([leader], [], [], 0.05)
                if ready:
                    try:
                        data += os.read(leader, 4096)
                    except OSError:
                        break
            return data
        deadline = time.monotonic() + 60
        while b"You: " not in shown and time.monotonic() < deadline:
            shown += read_for(0.2)
        for key in keys:
            os.write(leader, key)
            shown += read_for(0.4)
        status = process.wait(timeout=30)
        shown += read_for(0.2)
    os.close(leader)
    return shown.decode(errors="replace"), err.read_text(), status


def test_terminal_chat_edits_lines_keeps_history_and_leaves_quietly_on_ctrl_c(tmp_path):
    left, up = b"\x1b[D", b"\x1b[A"
    shown, err, status = pty_session([b"abc", left, b"X\r", up, b"\r", b"\x03"], tmp_path)
    assert "[abXc]" in shown                      # the Left arrow moved the cursor: line editing
    assert shown.count("[abXc]") == 2             # the Up arrow brought the line back: history
    assert "^[[A" not in shown and "^[[D" not in shown
    assert "CLEAN EXIT" in shown and status == 0  # Ctrl-C ends the session without a traceback
    assert "Traceback" not in shown + err
    assert "You:" not in err                      # the prompt is on stdout


def test_the_prompt_goes_to_stdout_without_a_terminal():
    script = PTY_CHAT.format(repo=str(REPO))
    result = subprocess.run([sys.executable, "-c", script], input="hello\n", capture_output=True, text=True,
                            timeout=60)
    assert "You: " in result.stdout and "You:" not in result.stderr
    assert "[hello]" in result.stdout and "CLEAN EXIT" in result.stdout


def test_answer_boxes_are_parsed_with_their_phrases_and_drawn():
    from PIL import Image

    from tinygpt_v.inference.web_demo import answer_boxes, draw_boxes
    answer = "<p>a red circle</p> {<10><20><30><40>} next to <p>a square</p> {<50><50><90><95>}"
    assert answer_boxes(answer) == [((10, 20, 30, 40), "a red circle"), ((50, 50, 90, 95), "a square")]
    assert answer_boxes("{<5><5><60><60>}") == [((5, 5, 60, 60), "")]
    assert answer_boxes("just text") == []
    image = Image.new("RGB", (200, 100), "white")
    drawn = draw_boxes(image, "{<10><20><30><40>}")
    assert drawn.getpixel((20, 20)) != (255, 255, 255)     # the box's left edge (x 10% of 200, y 20% of 100)
    assert drawn.getpixel((40, 30)) == (255, 255, 255)     # inside the box: untouched
    assert image.getpixel((20, 20)) == (255, 255, 255)     # the uploaded image itself is not drawn on
    assert draw_boxes(image, "no box here") is None


def test_task_tag_buttons_put_the_tag_in_front_of_the_question():
    from tinygpt_v.inference.web_demo import TASK_TAGS, with_tag
    assert {"[vqa]", "[refer]", "[grounding]"} <= set(TASK_TAGS)
    assert with_tag("what colour is it?", "[vqa]") == "[vqa] what colour is it?"
    assert with_tag("[vqa] the red circle", "[refer]") == "[refer] the red circle"
    assert with_tag("", "[grounding]") == "[grounding] "


def test_the_web_demo_shows_the_task_tag_buttons_and_a_box_image():
    pytest.importorskip("gradio")
    from tinygpt_v.inference.web_demo import build_demo
    demo = build_demo(lambda: None)
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"tag-vqa", "tag-refer", "tag-grounding", "boxes"} <= ids


# --- 8. lmms-eval plugin --------------------------------------------------------------------------------------

def test_the_lmms_plugin_imports_nothing_of_lmms_eval_until_used():
    code = ("import sys; sys.path.insert(0, %r); import tinygpt_v.evaluation.lmms_plugin as p; "
            "print(sorted(m for m in sys.modules if m.startswith('lmms_eval')))" % str(REPO))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_lmms_model_args_are_refused_by_name():
    from tinygpt_v.evaluation.lmms_plugin import check_model_args
    check_model_args({"max_batch_size": 4})  # lmms-eval passes it to every model
    with pytest.raises(ValueError, match=r"unknown model_args confg; accepted: pretrained, config"):
        check_model_args({"confg": "x.yaml"})


# --- 9. weight files follow the umask ------------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_weight_files_are_written_with_the_umask(tmp_path, umask, mode):
    from tinygpt_v.checkpoints import save_safetensors_atomic
    old = os.umask(umask)
    try:
        path = save_safetensors_atomic({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_chat_and_web_demo_without_any_model_source_say_so_in_one_line(capsys):
    from tinygpt_v import chat
    from tinygpt_v.inference import web_demo
    for main in (chat.main, web_demo.main):
        assert main([]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["error: give --cfg-path (a config with `model:`) or --checkpoint (an exported folder or a "
                       "trainer checkpoint)"]
