"""The `evaluation:` config section: its schema, its load-time check, and building its benchmarks.

    evaluation:
      checkpoint: path            # our checkpoint, an exported folder, or the original's stage .pth
      output_dir: output/eval
      scoring: both               # official | original | both (official is reported first)
      select: [gqa, vsr]          # which entries of `benchmarks` to run; null = all (eval.py --benchmarks)
      benchmarks:
        gqa: {questions: ..., image_root: ...}          # `name:` defaults to the entry's key
        refcoco_val: {name: refcoco, annotations: ..., image_root: ...}

Only selected entries are checked in full (their files must exist), so one suite file can list
benchmarks whose data is not on this machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import register_section, to_plain
from ..registry import BENCHMARKS, ConfigError, LocalPath, check_kwargs
from .benchmark import Benchmark


@dataclass(kw_only=True)
class EvalSettings:
    benchmarks: dict
    select: list[str] | None = None
    checkpoint: LocalPath | None = None
    output_dir: str = "output/eval"
    scoring: Literal["official", "original", "both"] = "official"
    batch_size: int = 10  # per benchmark unless its entry sets batch_size (the original: 10, IconQA/VSR 1)
    max_new_tokens: int = 20
    num_beams: int = 1
    limit: int | None = None  # first N samples of every benchmark, for smoke runs
    image_size: int | None = None  # null: the model's image_size
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on GPU, as loaded on CPU
    seed: int = 42  # set before building: untrained frozen parts (the demo's) come back as in training (run.seed)
    data_root: str = "data"  # for ${evaluation.data_root} in benchmark paths

    @property
    def scorings(self) -> list[str]:
        return ["official", "original"] if self.scoring == "both" else [self.scoring]


@register_section("evaluation")
def check_evaluation(section, key: str = "evaluation") -> None:
    settings = read_settings(section, key)
    build_benchmarks(settings, key)


def read_settings(section, key: str = "evaluation") -> EvalSettings:
    try:
        plain = to_plain(section)
    except Exception as e:  # an ${...} interpolation that does not resolve
        raise ConfigError(key, f"cannot resolve: {e}") from None
    if not isinstance(plain, dict):
        raise ConfigError(key, "expected a section (mapping)")
    check_kwargs(EvalSettings, plain, key)
    for i, name in enumerate(plain.get("select") or []):
        if name not in plain["benchmarks"]:
            configured = ", ".join(plain["benchmarks"]) or "(none)"
            raise ConfigError(f"{key}.select[{i}]",
                              f"no benchmark '{name}' in {key}.benchmarks; configured: {configured}")
    return EvalSettings(**plain)


def build_benchmarks(settings: EvalSettings, key: str = "evaluation") -> dict[str, Benchmark]:
    """The selected benchmarks (in `select` order, else as listed), checked against their schemas."""
    _import_benchmark_modules()
    names = settings.select if settings.select is not None else list(settings.benchmarks)
    built = {}
    for name in names:
        entry_key = f"{key}.benchmarks.{name}"
        entry = settings.benchmarks[name]
        if not isinstance(entry, dict):
            raise ConfigError(entry_key, "expected a section with the benchmark's files")
        entry = {"name": name, **entry}
        try:
            built[name] = BENCHMARKS.build(entry, entry_key)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:  # a benchmark's own check of its keys (__post_init__)
            raise ConfigError(entry_key, str(e)) from None
    return built


def settings_from_config(cfg) -> EvalSettings:
    if "evaluation" not in cfg:
        raise ConfigError("evaluation", "the config has no evaluation section")
    return read_settings(cfg.evaluation)


def _import_benchmark_modules() -> None:
    from . import benchmarks  # noqa: F401  (registers every benchmark)

