"""Fetch and verify the weight files the paper model needs (`python scripts/download_weights.py`).

What, from where and with which size / sha256: tinygpt_v/weights_manifest.json.
- Hub files (Phi-2 at a pinned revision, the authors' released stage checkpoints) go through
  `huggingface_hub.hf_hub_download`: the Hub cache ($HF_HUB_CACHE / $HF_HOME) is used and
  resumed, $HF_ENDPOINT and $HF_HUB_OFFLINE are honoured, progress bars are huggingface_hub's.
  `--dir` then gets a link to the cached file (a copy where links are not possible).
- The LAVIS files are plain HTTPS downloads into `<dest>.part`, resumed with an HTTP Range
  request after an interruption, checked (length, sha256), and only then renamed to `<dest>`:
  a file under its final name is always complete and verified.
Checks: the manifest's size and sha256 where recorded; otherwise the server's length and, for
Hub LFS files, the sha256 the Hub names the file by. Every computed sha256 is printed, so that a
manifest entry still `null` can be filled in.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

CHUNK = 1 << 20
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class DownloadError(RuntimeError):
    """A file could not be fetched or verified; the message names it."""


class ChecksumError(DownloadError):
    pass


class NotOnHub(DownloadError):
    """The repository has no such file at that revision."""


class OfflineError(DownloadError):
    """The source cannot be reached (no network, or offline mode) and no local copy exists."""

    def __init__(self, message: str, source: str, dest: Path):
        super().__init__(message)
        self.source, self.dest = source, dest


# --- manifest -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileSpec:
    """One file to place at `dest`: from `url`, or from `repo_id`/`filename` at `revision`."""
    entry: str
    dest: Path
    size: int | None
    sha256: str | None
    url: str | None = None
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None
    optional: bool = False            # a Hub file some revisions lack (tokenizer extras): absence is no error

    @property
    def source(self) -> str:
        if self.url:
            return self.url
        return f"https://huggingface.co/{self.repo_id}/resolve/{self.revision}/{self.filename}"


@dataclass
class Outcome:
    spec: FileSpec
    status: str                       # "downloaded", "present", "linked", "absent", "offline", "failed"
    sha256: str | None = None
    size: int | None = None
    message: str = ""
    notes: list[str] = field(default_factory=list)


def load_manifest(path: str | os.PathLike | None = None) -> dict:
    if path is None:
        text = resources.files("tinygpt_v").joinpath("weights_manifest.json").read_text()
        path = "tinygpt_v/weights_manifest.json"
    else:
        text = Path(path).read_text()
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise DownloadError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e
    for key in ("files", "sets"):
        if key not in manifest:
            raise DownloadError(f"{path}: no '{key}' section")
    return manifest


def plan(manifest: dict, selection: str, root: str | os.PathLike) -> list[FileSpec]:
    """The files of a set (`base`, `1`..`4`, `all`) or of named entries (comma separated)."""
    names = manifest["sets"].get(selection) or [s.strip() for s in selection.split(",") if s.strip()]
    unknown = [n for n in names if n not in manifest["files"]]
    if unknown:
        raise DownloadError(f"unknown weight set or entry {unknown}: choose one of {sorted(manifest['sets'])} "
                            f"or entries {sorted(manifest['files'])}")
    return [spec for name in names for spec in _specs(name, manifest["files"][name], Path(root))]


def _specs(name: str, entry: dict, root: Path) -> Iterable[FileSpec]:
    try:
        if entry["kind"] == "url":
            yield FileSpec(name, root / entry["dest"], entry.get("size"), entry.get("sha256"), url=entry["url"])
            return
        for filename, check in entry["files"].items():
            yield FileSpec(name, root / entry["dest"] / filename, check.get("size"), check.get("sha256"),
                           repo_id=entry["repo_id"], filename=filename, revision=entry.get("revision") or "main",
                           optional=bool(check.get("optional")))
    except KeyError as e:
        raise DownloadError(f"weights manifest: entry '{name}' lacks {e}") from e


# --- checks ---------------------------------------------------------------------------------------

def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, size: int | None, sha256: str | None, label: str) -> str:
    """Size first (cheap), then sha256; returns the computed sha256."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(f"{label}: size {actual_size} bytes, expected {size}")
    digest = sha256_file(path)
    if sha256 is not None and digest != sha256.lower():
        raise ChecksumError(f"{label}: sha256 {digest}, expected {sha256}")
    return digest


# --- plain HTTPS with resume ------------------------------------------------------------------

def fetch_url(url: str, dest: str | os.PathLike, size: int | None = None, sha256: str | None = None,
              progress: bool = True, timeout: float = 30, offline: bool = False) -> str:
    """Download `url` to `dest` through `dest.part` (resumed if present); verify; rename.
    Returns the sha256. On a checksum mismatch the partial file is deleted."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if offline:
        raise OfflineError(f"{dest.name}: offline mode, and it is not in {dest.parent}", url, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    total = _transfer(url, part, progress, timeout)
    expected = size if size is not None else total
    if expected is not None and part.stat().st_size < expected:
        raise DownloadError(f"{dest.name}: the transfer stopped at {part.stat().st_size} of {expected} bytes; "
                            f"run the same command again to resume from {part}")
    try:
        digest = verify(part, expected, sha256, f"{dest.name} (from {url})")
    except ChecksumError as e:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{e}; the download was deleted, nothing was written to {dest}") from None
    os.replace(part, dest)
    return digest


def _transfer(url: str, part: Path, progress: bool, timeout: float) -> int | None:
    """Append to `part` from where it stops; returns the full length when the server says it."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left after `offset`: the part is whole (checked next)
            return offset
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise OfflineError(f"cannot reach {urllib.parse.urlsplit(url).netloc} ({reason})", url, part) from None
    with response:
        resumed = response.status == 206
        total = _total_length(response, offset if resumed else 0)
        mode = "ab" if resumed else "wb"  # a server ignoring Range sends everything: start over
        start = offset if resumed else 0
        from tqdm.auto import tqdm
        with open(part, mode) as f, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                         desc=part.name.removesuffix(".part"), disable=not progress) as bar:
            try:
                for block in iter(lambda: response.read(CHUNK), b""):
                    f.write(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as e:  # connection dropped: keep the part for a resume
                raise DownloadError(f"{url}: the connection broke at {f.tell()} bytes ({e}); run the same "
                                    f"command again to resume from {part}") from None
    return total


def _total_length(response, start: int) -> int | None:
    content_range = response.headers.get("Content-Range")  # bytes a-b/total
    if content_range and "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return start + int(length) if length is not None else None


# --- Hugging Face Hub -------------------------------------------------------------------------------

def fetch_hub(spec: FileSpec, offline: bool = False, progress: bool = True) -> tuple[Path, str, list[str]]:
    """hf_hub_download into the Hub cache, verified; returns (cached path, sha256, notes)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled)
    offline = offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not progress:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    try:
        cached = hf_hub_download(spec.repo_id, spec.filename, revision=spec.revision,
                                 cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                                 endpoint=os.environ.get("HF_ENDPOINT") or None, local_files_only=offline)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        why = "offline mode" if offline else "the Hub cannot be reached"
        raise OfflineError(f"{spec.repo_id}/{spec.filename}: {why} and it is not in the Hub cache "
                           f"({type(e).__name__})", spec.source, spec.dest) from None
    except EntryNotFoundError:
        raise NotOnHub(f"{spec.source}: no such file in {spec.repo_id} at {spec.revision}") from None
    except HfHubHTTPError as e:
        if getattr(getattr(e, "response", None), "status_code", None) == 404:
            raise NotOnHub(f"{spec.source}: no such file in {spec.repo_id} at {spec.revision}") from None
        raise DownloadError(f"{spec.source}: {str(e).splitlines()[0]}") from None
    cached = Path(cached)
    notes = []
    lfs_sha = Path(os.path.realpath(cached)).name  # the Hub names LFS blobs by their sha256
    expected = spec.sha256 or (lfs_sha if SHA256_HEX.match(lfs_sha) else None)
    try:
        digest = verify(cached, spec.size, expected, f"{spec.repo_id}/{spec.filename}@{spec.revision}")
    except ChecksumError as e:
        blob = Path(os.path.realpath(cached))
        blob.unlink(missing_ok=True)
        cached.unlink(missing_ok=True)
        raise ChecksumError(f"{e}; the cached copy {blob} was deleted") from None
    commit = cached.parent.name if cached.parent.parent.name == "snapshots" else None
    if commit and spec.revision != commit:
        notes.append(f"revision {spec.revision} is commit {commit}: pin it in the manifest")
    return cached, digest, notes


def place(cached: Path, dest: Path) -> None:
    """`dest` -> the cached file (a symbolic link; a copy where links are not allowed), atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(os.path.realpath(cached))
    except OSError:
        shutil.copyfile(cached, tmp)
    os.replace(tmp, dest)


# --- one run ----------------------------------------------------------------------------------------

def fetch(spec: FileSpec, offline: bool = False, progress: bool = True) -> Outcome:
    """One file: kept if already in place (and verified where checks are recorded), else fetched."""
    try:
        if spec.dest.is_file() and not spec.dest.is_symlink():
            # a file placed by hand or by an earlier run of the URL path
            if spec.size is None and spec.sha256 is None:
                return Outcome(spec, "present", size=spec.dest.stat().st_size,
                               message="no size/sha256 recorded to check it against")
            digest = verify(spec.dest, spec.size, spec.sha256, str(spec.dest))
            return Outcome(spec, "present", digest, spec.dest.stat().st_size)
        if spec.url:
            digest = fetch_url(spec.url, spec.dest, spec.size, spec.sha256, progress, offline=offline)
            return Outcome(spec, "downloaded", digest, spec.dest.stat().st_size)
        cached, digest, notes = fetch_hub(spec, offline, progress)
        place(cached, spec.dest)
        return Outcome(spec, "linked", digest, cached.stat().st_size, notes=notes)
    except OfflineError as e:
        return Outcome(spec, "offline", message=str(e))
    except NotOnHub as e:
        return Outcome(spec, "absent" if spec.optional else "failed",
                       message=f"{e} (optional: not needed)" if spec.optional else str(e))
    except DownloadError as e:
        return Outcome(spec, "failed", message=str(e))


def convert_old_phi(folder: Path) -> str | None:
    """Convert a Phi-2 folder in an old layout now (the loader would do it on first use)."""
    from .phi2_layout import LAYOUT_NAMES, TODAY, detect_layout, today_layout_source
    if not folder.is_dir():
        return None
    layout = detect_layout(folder)
    if layout == TODAY:
        return f"{folder}: today's layout, nothing to convert"
    return f"{folder}: {LAYOUT_NAMES[layout]} -> {today_layout_source(folder)}"


def report(outcomes: list[Outcome], manifest_name: str = "tinygpt_v/weights_manifest.json",
           out=None) -> int:
    """Print what happened; 0 when every file is in place and verified, 1 on a failure, 2 when
    only offline files are missing."""
    out = out or sys.stdout
    for o in outcomes:
        line = f"{o.status:>10}  {o.spec.dest}"
        if o.size is not None:
            line += f"  {o.size} bytes"
        if o.sha256:
            line += f"  sha256 {o.sha256}"
            if o.spec.sha256 is None:
                line += f"  (not in the manifest: add it to {manifest_name})"
        if o.message:
            line += f"\n            {o.message}"
        for note in o.notes:
            line += f"\n            note: {note}"
        print(line, file=out)
    missing = [o for o in outcomes if o.status == "offline"]
    if missing:
        print("\nOffline: these files could not be fetched and are not here. On a machine with network access "
              "fetch them and copy them to these paths (or copy a Hugging Face cache and set HF_HUB_CACHE):",
              file=out)
        for o in missing:
            print(f"  {o.spec.source}\n      -> {o.spec.dest}", file=out)
    if any(o.status == "failed" for o in outcomes):
        return 1
    return 2 if missing else 0
