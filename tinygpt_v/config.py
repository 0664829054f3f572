"""Load, merge, override and validate configs.

A config is YAML with the sections `model`, `datasets`, `run`, `evaluation` and `inference`
(plus `paths`, named folders for interpolation such as `${paths.data}/coco`).
`defaults: [a.yaml, ...]` at the top includes other files first (looked up next to the
including file, then in the nearest `configs/` folder above it); the file's own keys win;
`--options a.b=c` overrides win over everything. Sections merge key by key, except a part
section whose `name:` changes, which is replaced whole. Validation runs once, at load time, and
raises ConfigError naming the dotted key and the file that set it.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from .registry import ConfigError

OPTIONS = "--options"  # provenance label for command-line overrides

# Section checkers: name -> fn(section, key). Packages register theirs on import.
_SECTION_CHECKERS: dict[str, Callable[[object, str], None]] = {}
# Checks across sections (e.g. the data's image size against the model's): fn(whole config as a
# plain dict), run after every section passed its own checker.
_CONFIG_CHECKERS: list[Callable[[dict], None]] = []


def register_section(name: str) -> Callable:
    def add(fn: Callable) -> Callable:
        _SECTION_CHECKERS[name] = fn
        return fn
    return add


def register_config_check(fn: Callable[[dict], None]) -> Callable[[dict], None]:
    """Register a check that needs several sections; it raises ConfigError naming a key."""
    if fn not in _CONFIG_CHECKERS:
        _CONFIG_CHECKERS.append(fn)
    return fn


def load_config(path: str | os.PathLike, options: Iterable[str] = (), validate: bool = True) -> DictConfig:
    """Read `path` with its defaults, apply `options` (`a.b=c` strings), validate."""
    provenance: dict[str, str] = {}
    cfg = _load_with_defaults(Path(path), provenance, chain=())
    options = list(options or ())
    if options:
        try:
            overrides = OmegaConf.from_dotlist(options)
        except Exception as e:
            raise ConfigError(OPTIONS, f"cannot parse {options}: {e}") from None
        _record(overrides, OPTIONS, provenance)
        cfg = _merge(cfg, overrides)
    if validate:
        validate_config(cfg, provenance)
    return cfg


def validate_config(cfg: DictConfig, provenance: Mapping[str, str] | None = None) -> None:
    """Check every section; a problem becomes one ConfigError naming key and file
    (`provenance`: dotted key -> file that set it)."""
    _import_section_owners()
    provenance = provenance or {}
    try:
        for name in cfg:
            if name not in _SECTION_CHECKERS:
                known = ", ".join(sorted(_SECTION_CHECKERS))
                raise ConfigError(str(name), f"unknown top-level section; allowed: {known}")
            _SECTION_CHECKERS[name](cfg[name], str(name))
        plain = to_plain(cfg)
        for check in _CONFIG_CHECKERS:
            check(plain)
    except ConfigError as e:
        raise e.with_file(file_of(e.key, provenance)) from None


def file_of(key: str, provenance: Mapping[str, str]) -> str | None:
    """The file that set `key`, or the closest enclosing key that a file set."""
    parts = key.replace("[", ".[").split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n]).replace(".[", "[")
        if candidate in provenance:
            return provenance[candidate]
    return None


def to_plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg


# --- internals -------------------------------------------------------------------------------

def _load_with_defaults(path: Path, provenance: dict[str, str], chain: tuple[Path, ...]) -> DictConfig:
    path = path.expanduser()
    if not path.is_file():
        raise ConfigError("defaults" if chain else "--cfg-path", f"config file not found: {path}",
                          str(chain[-1]) if chain else None)
    if path.resolve() in chain:
        raise ConfigError("defaults", f"include cycle: {' -> '.join(map(str, chain + (path,)))}", str(path))
    try:
        own = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry the line number in their text
        raise ConfigError("<yaml>", f"cannot parse: {e}", str(path)) from None
    if not isinstance(own, DictConfig):
        raise ConfigError("<root>", "a config file must be a mapping", str(path))
    includes = own.pop("defaults", [])
    if not isinstance(includes, (list, ListConfig)):
        raise ConfigError("defaults", "expected a list of config files", str(path))
    merged = OmegaConf.create({})
    for include in includes:
        sub = _load_with_defaults(_resolve_include(str(include), path), provenance, chain + (path.resolve(),))
        merged = _merge(merged, sub)
    _record(own, str(path), provenance)
    return _merge(merged, own)


def _merge(base: DictConfig, override: DictConfig) -> DictConfig:
    """Deep merge, except that a part section whose `name:` changes is replaced whole: the
    old builder's keys mean nothing to the new one."""
    base = base.copy()
    _drop_renamed_parts(base, override)
    return OmegaConf.merge(base, override)


def _drop_renamed_parts(base: DictConfig, override: DictConfig) -> None:
    for key in list(override.keys()):
        new, old = override._get_node(key), base._get_node(key) if key in base else None
        if not isinstance(new, DictConfig) or not isinstance(old, DictConfig):
            continue
        if "name" in new and "name" in old and new.name != old.name:
            del base[key]
        else:
            _drop_renamed_parts(old, new)


def _resolve_include(name: str, including: Path) -> Path:
    candidates = [including.parent / name]
    candidates += [parent / "configs" / name for parent in including.resolve().parents]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return candidates[0]


def _record(node, file: str, provenance: dict[str, str], prefix: str = "") -> None:
    if isinstance(node, DictConfig):
        for k in node.keys():
            key = f"{prefix}.{k}" if prefix else str(k)
            provenance[key] = file
            _record(node._get_node(k), file, provenance, key)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            key = f"{prefix}[{i}]"
            provenance[key] = file
            _record(node._get_node(i), file, provenance, key)


def _import_section_owners() -> None:
    """The packages that own sections register their checkers when imported."""
    import importlib
    for module in ("tinygpt_v.models", "tinygpt_v.data", "tinygpt_v.training", "tinygpt_v.evaluation",
                   "tinygpt_v.inference"):
        importlib.import_module(module)
