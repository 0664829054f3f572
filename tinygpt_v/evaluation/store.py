"""Predictions of one benchmark on disk, written as they are made so an interrupted run resumes.

While running, each process appends to `<name>.rank<r>.jsonl`; when all are done the main process
merges them, in sample order, into `<name>.jsonl` and removes the parts. A later run reads both
kinds of file and predicts only the samples not found there. `<name>.meta.json` records what the
predictions were made with, so a run with other settings is refused instead of mixed in.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from ..registry import ConfigError


class PredictionStore:
    def __init__(self, output_dir: str | os.PathLike, name: str):
        self.dir, self.name = Path(output_dir), name
        self.final = self.dir / f"{name}.jsonl"
        self.meta = self.dir / f"{name}.meta.json"

    def part(self, rank: int) -> Path:
        return self.dir / f"{self.name}.rank{rank}.jsonl"

    def check_meta(self, meta: dict) -> None:
        """Refuse to resume predictions made with different settings."""
        if not self.meta.exists():
            return
        previous = json.loads(self.meta.read_text())
        changed = sorted(k for k in meta.keys() | previous.keys() if meta.get(k) != previous.get(k))
        if changed:
            raise ConfigError("evaluation.output_dir",
                              f"{self.dir} holds {self.name} predictions made with other settings "
                              f"({', '.join(changed)}: {[previous.get(k) for k in changed]} -> "
                              f"{[meta.get(k) for k in changed]}); use another output_dir or delete them")

    def record_meta(self, meta: dict) -> None:
        if not self.meta.exists():
            _write_atomic(self.meta, json.dumps(meta, indent=1, sort_keys=True))

    def finished(self, repair: bool = False) -> dict[str, dict]:
        """Rows already predicted, by sample id, from the merged file and any parts.

        A part whose last line was cut off by a killed run is read without it; with `repair` (the
        main process, before any process appends again) the line is also removed from the file."""
        rows: dict[str, dict] = {}
        for path in [self.final, *sorted(self.dir.glob(f"{self.name}.rank*.jsonl"))]:
            if path.exists():
                found, torn = _read_rows(path)
                rows.update((row["id"], row) for row in found)
                if torn and repair:
                    _rewrite(path, found)
        return rows

    def append(self, rank: int, rows: list[dict]) -> None:
        with open(self.part(rank), "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a finished batch survives a crash of the machine

    def merge(self, order: list[str]) -> list[dict]:
        """Write the rows of `order` (sample ids) into the merged file; remove the parts."""
        found = self.finished()
        missing = [sample_id for sample_id in order if sample_id not in found]
        if missing:
            raise RuntimeError(f"{self.name}: {len(missing)} samples have no prediction (first: {missing[0]})")
        rows = [found[sample_id] for sample_id in order]
        _rewrite(self.final, rows)
        for part in self.dir.glob(f"{self.name}.rank*.jsonl"):
            part.unlink()
        return rows


def _read_rows(path: Path) -> tuple[list[dict], bool]:
    """The rows of a predictions file, and whether its last line was cut off."""
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if line_no == len(lines):  # the last line of a run killed mid-write: predict it again
                warnings.warn(f"{path}:{line_no}: ignoring a partly written prediction")
                return rows, True
            raise ValueError(f"{path}:{line_no}: not a valid prediction row; delete the file to start over") from None
    return rows, False


def _rewrite(path: Path, rows: list[dict]) -> None:
    _write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # readers see the old file or the new one, never half of it
