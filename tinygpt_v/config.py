"""Load, merge, override and validate configs.

A config is YAML with the sections `model`, `datasets`, `run`, `evaluation` and `inference`
(plus `paths`, named folders for interpolation such as `${paths.data}/coco`).
`defaults: [a.yaml, ...]` at the top includes other files first; the file's own keys win;
`--options a.b=c` overrides win over everything. Sections merge key by key, except a part
section whose `name:` changes, which is replaced whole. Validation runs once, at load time, and
raises ConfigError naming the dotted key and the file that set it.

An include is looked up, in order: next to the including file; in the `configs/` folder of each
of its parent folders; in the current directory's `configs/`; in the shipped configs (a source
checkout's `configs/`, or a wheel's `<prefix>/share/tinygpt_v/configs/`). So a config kept
anywhere (`~/exp/my.yaml`) can say `defaults: [models/tinygpt_v.yaml]`. A not-found include
names every place looked. A relative `--cfg-path` that is not under the current directory is
looked up in the shipped tree as well (`train_configs/demo.yaml` works from any folder).
"""
from __future__ import annotations

import os
import site
import sys
import sysconfig
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
    cfg = _load_with_defaults(resolve_config_path(path), provenance, chain=())
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
        if chain:
            raise ConfigError("defaults", f"config file not found: {path}", str(chain[-1]))
        if path.is_absolute():
            raise ConfigError("--cfg-path", f"config file not found: {path}")
        looked = [Path.cwd()] + shipped_roots()
        raise ConfigError("--cfg-path", f"config file not found: {path} (looked in: "
                                        f"{', '.join(str(p) for p in _unique(looked))})")
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


def shipped_roots() -> list[Path]:
    """Folders holding the shipped `configs/`, `train_configs/`, `eval_configs/`: the source
    checkout this package runs from (editable install), then a wheel's data-files folder
    (`[tool.setuptools.data-files]` in pyproject.toml: `<prefix>/share/tinygpt_v`)."""
    checkout = Path(__file__).resolve().parent.parent
    roots = [checkout] if (checkout / "pyproject.toml").is_file() and (checkout / "configs").is_dir() else []
    for prefix in (sysconfig.get_path("data"), sys.prefix, getattr(site, "USER_BASE", None)):
        if prefix:
            roots.append(Path(prefix) / "share" / "tinygpt_v")
    return _unique(roots)


def include_candidates(name: str, including: Path) -> list[Path]:
    """Where `defaults: [name]` in `including` is looked for, in order."""
    candidates = [including.parent / name]
    candidates += [parent / "configs" / name for parent in including.resolve().parents]
    candidates.append(Path.cwd() / "configs" / name)
    candidates += [root / "configs" / name for root in shipped_roots()]
    return _unique(candidates)


def _resolve_include(name: str, including: Path) -> Path:
    expanded = Path(name).expanduser()
    if expanded.is_absolute():
        return expanded
    candidates = include_candidates(name, including)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError("defaults", f"config file not found: {name} (looked in: "
                                  f"{', '.join(os.path.abspath(c.parent) for c in candidates)})", str(including))


def resolve_config_path(path: str | os.PathLike) -> Path:
    """`path` as given when it exists; a relative path that does not is looked up in the shipped
    tree (so `--cfg-path train_configs/demo.yaml` works from another folder after `pip install .`)."""
    given = Path(path).expanduser()
    if given.is_file() or given.is_absolute():
        return given
    for root in shipped_roots():
        if (root / given).is_file():
            return root / given
    return given


def _unique(paths: Iterable[Path]) -> list[Path]:
    seen, out = set(), []
    for path in paths:
        key = os.path.normpath(str(path))
        if key not in seen:
            seen.add(key)
            out.append(path)
    return out


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
