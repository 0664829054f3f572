"""Name -> builder tables, and checking a YAML section against a builder's signature.

Every swappable part (vision encoder, Q-Former, connector, LLM, tokenizer, dataset, processor,
benchmark, lr schedule) is a function registered under a name. A YAML section picks the
function with `name:` and the remaining keys are its keyword arguments. Because the signature
is the schema, a section is checked at config-load time without building anything: unknown
keys, missing required keys, wrong types and missing local files are reported with the key's
full dotted path.

Adding a part is therefore one decorated function plus one YAML file.
"""
from __future__ import annotations

import difflib
import inspect
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union


class ConfigError(ValueError):
    """A configuration problem, reported with the dotted key path (and the file, when known)."""

    def __init__(self, key: str, message: str, file: str | None = None):
        self.key, self.message, self.file = key, message, file
        super().__init__(self._text())

    def _text(self) -> str:
        where = f" (set in {self.file})" if self.file else ""
        return f"{self.key}: {self.message}{where}"

    def with_file(self, file: str | None) -> "ConfigError":
        return ConfigError(self.key, self.message, file)


# --- marker types used in builder signatures ---------------------------------------------------

class LocalPath(str):
    """A path on disk that must exist when the config is loaded."""


class PathOrHubId(str):
    """A local path, or a Hugging Face hub id such as `microsoft/phi-2`.

    Something that looks like a path (absolute, relative with ./ or ../, ~, or a file suffix)
    must exist; anything else is taken as a hub id and resolved by the loader."""


@dataclass(frozen=True)
class Part:
    """Annotated marker: the value is a section `{name: ..., **kwargs}` built by `registry`."""
    registry: "Registry"


@dataclass(frozen=True)
class Section:
    """Annotated marker: the value is a section of keyword arguments for `schema`."""
    schema: Callable


@dataclass(frozen=True)
class Bound:
    """Annotated marker: a finite number within limits, e.g. `Annotated[float, Bound(gt=0)]`.

    `gt`/`ge` are the lower limit (exclusive / inclusive), `lt`/`le` the upper one. NaN and
    infinities are always refused: no setting means "infinitely many" (use null for "none")."""
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def check(self, value: Any, key: str) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return  # the type check reports it
        if not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value}")
        broken = ((self.gt is not None and not value > self.gt) or (self.ge is not None and not value >= self.ge)
                  or (self.lt is not None and not value < self.lt) or (self.le is not None and not value <= self.le))
        if broken:
            raise ConfigError(key, f"must be {self.describe()}, got {value}")

    def describe(self) -> str:
        low = (f"greater than {self.gt}" if self.gt is not None else f"at least {self.ge}" if self.ge is not None
               else "")
        high = f"less than {self.lt}" if self.lt is not None else f"at most {self.le}" if self.le is not None else ""
        return " and ".join(part for part in (low, high) if part) or "finite"


# Number types for builder signatures: the bound is part of the schema, checked at load time.
PositiveFloat = Annotated[float, Bound(gt=0)]
NonNegativeFloat = Annotated[float, Bound(ge=0)]
PositiveInt = Annotated[int, Bound(ge=1)]
NonNegativeInt = Annotated[int, Bound(ge=0)]
Fraction = Annotated[float, Bound(ge=0, lt=1)]  # dropout, Adam betas


# --- the registry ---------------------------------------------------------------------------

class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def add(fn: Callable) -> Callable:
            if name in self._builders:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._builders[name] = fn
            return fn
        return add

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders

    def get(self, name: str, key: str = "name") -> Callable:
        if name not in self._builders:
            raise ConfigError(key, f"unknown {self.kind} '{name}'{_suggest(name, self._builders)}; "
                                   f"registered: {', '.join(self.names()) or '(none)'}")
        return self._builders[name]

    def check(self, section: Mapping, key: str) -> None:
        """Validate a `{name: ..., **kwargs}` section without building it."""
        if not isinstance(section, Mapping) or "name" not in section:
            raise ConfigError(key, f"expected a section with a `name:` choosing a {self.kind}")
        fn = self.get(section["name"], f"{key}.name")
        check_kwargs(fn, {k: v for k, v in section.items() if k != "name"}, key)

    def build(self, section: Mapping, key: str, **extra: Any) -> Any:
        """Build from a section; `extra` are arguments supplied by code, not by YAML."""
        self.check(section, key)
        fn = self.get(section["name"], f"{key}.name")
        kwargs = {k: _plain(v) for k, v in section.items() if k != "name"}
        return fn(**kwargs, **extra)


VISION_ENCODERS = Registry("vision encoder")
QFORMERS = Registry("Q-Former")
CONNECTORS = Registry("connector")
LLMS = Registry("LLM")
TOKENIZERS = Registry("tokenizer")
MODELS = Registry("model architecture")
DATASETS = Registry("dataset")
PROCESSORS = Registry("processor")
BENCHMARKS = Registry("benchmark")
LR_SCHEDULES = Registry("lr schedule")


# --- signature checking -------------------------------------------------------------------------

def check_kwargs(fn: Callable, kwargs: Mapping, key: str, supplied_by_code: tuple[str, ...] = ()) -> None:
    """Check YAML kwargs against `fn`'s signature; raise ConfigError naming `key.<arg>`."""
    params = inspect.signature(fn).parameters
    hints = typing.get_type_hints(fn, include_extras=True)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    skip = set(supplied_by_code) | set(getattr(fn, "_supplied_by_code", ()))
    for arg in kwargs:
        if arg in skip:
            raise ConfigError(f"{key}.{arg}", "is set by code from the neighbouring parts; remove it")
        if arg not in named and not takes_any:
            raise ConfigError(f"{key}.{arg}", f"unknown key{_suggest(arg, named)}; "
                                              f"allowed: {', '.join(sorted(named))}")
    for name, p in named.items():
        if name in skip:
            continue
        if name not in kwargs:
            if p.default is p.empty:
                raise ConfigError(f"{key}.{name}", "required key is missing")
            continue
        check_value(kwargs[name], hints.get(name, Any), f"{key}.{name}")


def supplied_by_code(*names: str) -> Callable[[Callable], Callable]:
    """Mark builder arguments that code passes (e.g. widths of the neighbouring parts)."""
    def mark(fn: Callable) -> Callable:
        fn._supplied_by_code = names
        return fn
    return mark


def check_value(value: Any, hint: Any, key: str) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        check_value(value, args[0], key)
        for marker in hint.__metadata__:
            if isinstance(marker, Part):
                marker.registry.check(value, key)
            elif isinstance(marker, Section):
                check_kwargs(marker.schema, value or {}, key)
            elif isinstance(marker, Bound):
                marker.check(value, key)
        return
    if hint is Any or hint is inspect.Parameter.empty:
        return
    if origin in (Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return check_value(value, option, key)
            except ConfigError as e:
                errors.append(e)
        deeper = [e for e in errors if e.key != key]  # the option that matched the shape, failing inside
        if deeper:
            raise deeper[0]
        raise ConfigError(key, " / ".join(dict.fromkeys(e.message for e in errors)))
    if hint is type(None):
        if value is not None:
            raise ConfigError(key, f"expected null, got {_describe(value)}")
        return
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"expected one of {list(args)}, got {value!r}")
        return
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)) and not _is_listconfig(value):
            raise ConfigError(key, f"expected a list, got {_describe(value)}")
        for i, item in enumerate(value):
            check_value(item, args[0] if args else Any, f"{key}[{i}]")
        return
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a section (mapping), got {_describe(value)}")
        return
    if isinstance(hint, type) and issubclass(hint, (LocalPath, PathOrHubId)):
        return _check_path(value, hint, key)
    _check_scalar(value, hint, key)


def _check_scalar(value: Any, hint: Any, key: str) -> None:
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value):  # never a meaningful setting; it would poison every number it touches
            raise ConfigError(key, "must be a number, got nan")
        return
    if hint is int and isinstance(value, bool):
        raise ConfigError(key, f"expected int, got {_describe(value)}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(key, f"expected {hint.__name__}, got {_describe(value)}")


# Suffixes that mark a file, not a hub id (hub ids may hold dots: Salesforce/blip2-opt-2.7b).
FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".json", ".jsonl", ".yaml", ".yml",
                 ".txt", ".tar", ".gz", ".zip")


def looks_like_local_path(value: str) -> bool:
    return (value.startswith(("/", "./", "../", "~")) or value.lower().endswith(FILE_SUFFIXES)
            or value.count("/") != 1 or os.path.exists(os.path.expanduser(value)))


def _check_path(value: Any, hint: type, key: str) -> None:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a path, got {_describe(value)}")
    if hint is PathOrHubId and not looks_like_local_path(value):
        return
    if not os.path.exists(os.path.expanduser(value)):
        raise ConfigError(key, f"path does not exist: {value}")


def _is_listconfig(value: Any) -> bool:
    return type(value).__name__ == "ListConfig"


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _suggest(name: str, known: Mapping | list) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python, so builders see lists and dicts."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value
