"""What a run reports: trackers (wandb, tensorboard) through accelerate, a per-step metrics file,
a progress bar, the final summary line and the loss / lr curve picture.

`metrics.jsonl` in the output folder holds one line per step (step, loss, lr, grad norm,
tokens, seconds). It survives a resume (lines after the resumed step are dropped, so a killed
run's extra steps do not appear twice) and is what the curve picture is drawn from.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import netrc
import os
import time
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


# --- trackers ----------------------------------------------------------------------------------------

def tracker_names(run) -> list[str]:
    """The accelerate trackers this run gets. `run.<tracker>: null` (the default) means "when
    installed": a missing package is skipped silently, so the main install runs clean. `true`
    asks for it: a missing package is then a warning (metrics.jsonl and the curves PNG are
    written either way)."""
    packages = {"wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX")}
    names = []
    for name, candidates in packages.items():
        wanted = getattr(run, name, None)
        if wanted is False:
            continue
        if any(importlib.util.find_spec(p) for p in candidates):
            names.append(name)
        elif wanted:
            logger.warning("run.%s is on but %s is not installed: pip install 'tinygpt_v[logging]' "
                           "(or set run.%s: false)", name, candidates[0], name)
    return names


def wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def tracker_init_kwargs(run, output_dir: Path) -> dict:
    """wandb runs offline when no API key is configured (and WANDB_MODE does not say otherwise)."""
    mode = os.environ.get("WANDB_MODE") or ("online" if wandb_has_key() else "offline")
    return {"wandb": {"mode": mode, "dir": str(output_dir), "name": run.job_name or output_dir.name}}


def flat_config(config: dict, prefix: str = "") -> dict:
    """Nested config -> {"run.init_lr": 1e-4, ...} with lists as strings (what tensorboard's
    hparams accept)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


# --- metrics file ------------------------------------------------------------------------------------

class MetricsLog:
    """Appends one JSON line per step; written by the main process only.

    A line cut short by a crash or a full disk is repaired when the run resumes: the file is
    truncated to its last complete line, with a warning naming the file. A damaged line inside the
    file is skipped with a warning naming file and line (metrics are a record, never a reason
    to stop training)."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.path, self.enabled = Path(output_dir) / METRICS_FILE, enabled

    def start(self, resumed_step: int) -> None:
        """Keep the lines of steps <= resumed_step (none on a fresh run)."""
        if not self.enabled:
            return
        self.repair()
        kept = [r for r in self.read() if r["step"] <= resumed_step] if resumed_step else []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def repair(self) -> bool:
        """Truncate a torn last line (no newline at the end); returns whether there was one."""
        if not self.path.is_file():
            return False
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return False
        keep = data.rfind(b"\n") + 1
        with self.path.open("r+b") as f:
            f.truncate(keep)
        logger.warning("%s: its last line was cut short (%d bytes, an interrupted write or a full disk); "
                       "truncated to the last complete line", self.path, len(data) - keep)
        return True

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        records = []
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                int(record["step"])
            except (ValueError, TypeError, KeyError) as e:
                logger.warning("%s:%d: damaged metrics line skipped (%s)", self.path, lineno, e)
                continue
            records.append(record)
        return records


# --- progress ----------------------------------------------------------------------------------------

class Progress:
    """tqdm bar over steps with loss, lr and tokens/s of the last window; ETA comes from tqdm."""

    def __init__(self, start: int, total: int, desc: str, enabled: bool):
        self.bar = tqdm(total=total, initial=start, desc=desc, disable=not enabled, dynamic_ncols=True,
                        unit="step", smoothing=0.1, mininterval=0.5)
        self.window_tokens, self.window_start = 0, time.perf_counter()

    def update(self, tokens: int) -> None:
        self.window_tokens += tokens
        self.bar.update(1)

    def show(self, loss: float, lr: float) -> float:
        """Put the window's numbers on the bar; returns its tokens/s and starts a new window."""
        now = time.perf_counter()
        tokens_per_s = self.window_tokens / max(now - self.window_start, 1e-9)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.window_tokens, self.window_start = 0, now
        return tokens_per_s

    def close(self) -> None:
        self.bar.close()


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


# --- the curve picture ---------------------------------------------------------------------------------

def plot_curves(records: list[dict], path: Path, title: str = "") -> Path | None:
    """Loss (raw and smoothed) and lr against the step, one above the other."""
    if not records:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax_loss.plot(steps, losses, alpha=0.3, linewidth=0.8, label="loss")
    ax_loss.plot(steps, smooth(losses), linewidth=1.5, label="smoothed")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right")
    ax_loss.set_title(title)
    ax_lr.plot(steps, [r["lr"] for r in records], color="tab:orange")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def smooth(values: list[float], window: int | None = None) -> list[float]:
    """Trailing mean over ~2% of the run (at least 1 point)."""
    window = window or max(1, len(values) // 50)
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value if math.isfinite(value) else 0.0
        if i >= window:
            total -= values[i - window] if math.isfinite(values[i - window]) else 0.0
        out.append(total / min(i + 1, window))
    return out
