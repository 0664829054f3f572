"""The `evaluation:` config section: its schema, its load-time check, and building its benchmarks.

    evaluation:
      checkpoint: path            # our checkpoint, an exported folder, or the original's stage .pth
      output_dir: output/eval
      scoring: both               # a scoring, a list / comma-separated list of them, both (official,
                                  # original) or all; each benchmark reports those it offers
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
    scoring: str | list[str] = "official"  # see the module docstring; names checked at load time
    batch_size: int = 10  # per benchmark unless its entry sets batch_size (the original: 10, IconQA/VSR 1)
    max_new_tokens: int = 20
    num_beams: int = 1
    limit: int | None = None  # first N samples of every benchmark, for smoke runs
    image_size: int | None = None  # null: the model's image_size
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on GPU, as loaded on CPU
    seed: int = 42  # set before building: untrained frozen parts (the demo's) come back as in training (run.seed)
    data_root: str = "data"  # for ${evaluation.data_root} in benchmark paths
    merge_lora: bool = True  # fold LoRA into the LLM weights for decoding (faster tokens; rounding-level change)
    static_cache: bool = False  # preallocated KV cache (fixed shapes) in generate
    compile: bool = False  # torch.compile the decode step (needs static_cache; CUDA graphs on a GPU)

    @property
    def scorings(self) -> list[str]:
        return parse_scorings(self.scoring)


def known_scorings() -> list[str]:
    """Every scoring some registered benchmark offers, defaults first."""
    _import_benchmark_modules()
    names: dict[str, None] = {}
    for benchmark in BENCHMARKS.names():
        names.update(dict.fromkeys(BENCHMARKS.get(benchmark).SCORINGS))
    return sorted(names, key=lambda n: (n != "official", n != "original", n))


def parse_scorings(scoring: str | list[str], key: str = "evaluation.scoring") -> list[str]:
    """"both" -> official, original; "all" -> every known scoring; "a,b" or [a, b] -> those."""
    if scoring == "both":
        return ["official", "original"]
    if scoring == "all":
        return known_scorings()
    names = [n.strip() for n in scoring.split(",")] if isinstance(scoring, str) else [str(n) for n in scoring]
    known = known_scorings()
    for name in names:
        if name not in known:
            raise ConfigError(key, f"unknown scoring {name!r}; known: {', '.join(known)}, both, all")
    if not names or len(set(names)) != len(names):
        raise ConfigError(key, f"expected distinct scoring names, got {scoring!r}")
    return names


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
    parse_scorings(plain.get("scoring", "official"), f"{key}.scoring")
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

