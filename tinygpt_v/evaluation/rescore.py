"""Score an existing predictions file without a model: ours, lmms-eval's or VLMEvalKit's.

    python eval.py --rescore output/eval/okvqa.jsonl --benchmark okvqa --scoring official,evalai,original

The ground truth comes from the benchmark's own files (the config entry, as for a normal run);
the file only supplies, per sample id, the model's reply. So numbers from other frameworks are
scored by the same scorers, on the same questions. Readers, chosen by the file:

- ours: the `<benchmark>.jsonl` the runner writes (`{"id", "prediction", ...}` per line);
- lmms-eval `--log_samples`: jsonl lines `{"doc_id", "doc", "filtered_resps", "resps", ...}`
  (or a JSON file whose "logs" list holds them, as older versions write); the reply is
  `filtered_resps[0]` (else `resps[0][0]`), the id `doc[<id key>]`;
- VLMEvalKit: its `.xlsx`, `.tsv` or `.csv` prediction table, columns `prediction` and the id
  column. `.xlsx` is read with the standard library (the first sheet); an empty cell is "".

The id key: `--id-key`, else the first of "question_id", "id", "index" the record has (our
samples use the benchmark's own ids: VQA question_id, GQA question id, ...). Every sample must
have exactly one prediction: a duplicate or an id the benchmark does not have is an error naming
the file and line; missing ids are an error naming the file, the count and the first ids.
"""
from __future__ import annotations

import csv
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from ..registry import ConfigError
from .benchmark import Benchmark, BenchmarkDataError
from .settings import build_benchmarks, parse_scorings, settings_from_config

ID_KEYS = ("question_id", "id", "index")


@dataclass(frozen=True)
class Prediction:
    where: str  # "file:line" (jsonl, tsv) or "file: row n" (xlsx), for error messages
    id: str
    reply: str


def rescore(benchmark: Benchmark, path: str, scorings: list[str], id_key: str | None = None,
            name: str = "benchmark", output_dir: str = ".") -> dict:
    """{"samples": n, scoring: metrics, ...} for the predictions in `path`. A split without
    answers (VQAv2 test-dev) is not scored: its outputs (the EvalAI submission) are written to
    `output_dir` and listed under "outputs"."""
    for scoring in scorings:
        if scoring not in benchmark.SCORINGS:
            raise BenchmarkDataError(f"{type(benchmark).__name__} has no scoring {scoring!r}; "
                                     f"it offers: {', '.join(benchmark.SCORINGS)}")
    rows = rows_for(benchmark, read_predictions(path, id_key), path)
    if not benchmark.has_ground_truth():
        return {"samples": len(rows), "outputs": benchmark.write_outputs(rows, output_dir, name)}
    return {"samples": len(rows), **{s: benchmark.score(rows, s) for s in scorings}}


def rescore_from_config(cfg, name: str, path: str, scoring: str | None = None, id_key: str | None = None,
                        output_dir: str = ".") -> tuple[dict, list[str]]:
    """Build benchmark `name` of the config's `evaluation.benchmarks` and rescore `path`.

    Returns (result, scorings). Without `scoring`: the config's scorings this benchmark offers."""
    settings = settings_from_config(cfg)
    if name not in settings.benchmarks:
        raise ConfigError("evaluation.benchmarks", f"no benchmark '{name}' (--benchmark); configured: "
                                                   f"{', '.join(settings.benchmarks) or '(none)'}")
    entry = dict(settings.benchmarks[name])
    # Rescoring reads no images: an image folder that is not on this machine is no error.
    if isinstance(entry.get("image_root"), str) and not Path(entry["image_root"]).exists():
        entry["image_root"] = "."
    settings.benchmarks, settings.select = {name: entry}, [name]
    benchmark = build_benchmarks(settings)[name]
    if scoring:
        scorings = parse_scorings(scoring, "--scoring")
    else:
        scorings = [s for s in settings.scorings if s in benchmark.SCORINGS]
    return rescore(benchmark, path, scorings, id_key, name, output_dir), scorings


def rows_for(benchmark: Benchmark, predictions: list[Prediction], path: str) -> list[dict]:
    """The runner's rows (sample order) from the predictions; every id must match once."""
    samples = benchmark.samples()
    known = {s.id for s in samples}
    reply_of: dict[str, Prediction] = {}
    for p in predictions:
        if p.id in reply_of:
            raise BenchmarkDataError(f"{p.where}: id {p.id} occurs twice (first at {reply_of[p.id].where})")
        if p.id not in known:
            raise BenchmarkDataError(f"{p.where}: id {p.id} is not a sample of the benchmark "
                                     f"({len(known)} samples, e.g. {next(iter(known), '-')})")
        reply_of[p.id] = p
    missing = [s.id for s in samples if s.id not in reply_of]
    if missing:
        raise BenchmarkDataError(f"{path}: {len(missing)} of {len(samples)} samples have no prediction "
                                 f"(first: {', '.join(missing[:5])})")
    return [{"id": s.id, "prompt": s.prompt, "prediction": reply_of[s.id].reply, "target": s.target}
            for s in samples]


# --- readers ----------------------------------------------------------------------------------

def read_predictions(path: str, id_key: str | None = None) -> list[Prediction]:
    suffix = Path(path).suffix.lower()
    if not Path(path).is_file():
        raise BenchmarkDataError(f"{path}: predictions file not found")
    if suffix == ".xlsx":
        return _from_table(path, _xlsx_rows(path), id_key)
    if suffix in (".tsv", ".csv"):
        return _from_table(path, _delimited_rows(path, "\t" if suffix == ".tsv" else ","), id_key)
    if suffix in (".jsonl", ".json"):
        return [_from_record(where, record, id_key) for where, record in _json_records(path)]
    raise BenchmarkDataError(f"{path}: unknown predictions format {suffix!r}; expected .jsonl/.json "
                             "(ours, lmms-eval) or .xlsx/.tsv/.csv (VLMEvalKit)")


def _json_records(path: str) -> list[tuple[str, dict]]:
    text = Path(path).read_text(encoding="utf-8")
    try:  # a whole-file JSON: lmms-eval's older {"logs": [...]} or a list of records
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and isinstance(whole.get("logs"), list):
        return [(f"{path}: logs[{i}]", r) for i, r in enumerate(whole["logs"])]
    if isinstance(whole, list):
        return [(f"{path}: entry {i}", r) for i, r in enumerate(whole)]
    records = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((f"{path}:{line_no}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise BenchmarkDataError(f"{path}:{line_no}: not valid JSON: {e.msg}") from None
    return records


def _from_record(where: str, record, id_key: str | None) -> Prediction:
    if not isinstance(record, dict):
        raise BenchmarkDataError(f"{where}: expected an object, got {type(record).__name__}")
    if "prediction" in record:  # ours
        return Prediction(where, _id_of(where, record, id_key), _text(where, record["prediction"]))
    if "doc" in record and ("filtered_resps" in record or "resps" in record):  # lmms-eval
        return Prediction(where, _id_of(where, record["doc"], id_key, "doc."), _lmms_reply(where, record))
    raise BenchmarkDataError(f"{where}: neither our prediction row (id, prediction) nor an lmms-eval "
                             f"sample (doc, filtered_resps); keys: {', '.join(sorted(record))}")


def _lmms_reply(where: str, record: dict):
    reply = record.get("filtered_resps") or record.get("resps")
    while isinstance(reply, list):  # [reply] or [[reply]]: one request, one response
        if not reply:
            raise BenchmarkDataError(f"{where}: no response in filtered_resps/resps")
        reply = reply[0]
    return _text(where, reply)


def _from_table(path: str, rows: list[tuple[str, dict]], id_key: str | None) -> list[Prediction]:
    predictions = []
    for where, row in rows:
        if "prediction" not in row:
            raise BenchmarkDataError(f"{path}: no 'prediction' column (columns: {', '.join(row)})")
        reply = row["prediction"]
        predictions.append(Prediction(where, _id_of(where, row, id_key), "" if reply is None else str(reply)))
    return predictions


def _id_of(where: str, record, id_key: str | None, prefix: str = "") -> str:
    if not isinstance(record, dict):
        raise BenchmarkDataError(f"{where}: expected an object holding the sample id")
    keys = [id_key] if id_key else [k for k in ID_KEYS if k in record]
    if not keys or keys[0] not in record or record[keys[0]] in (None, ""):
        wanted = id_key or " / ".join(ID_KEYS)
        raise BenchmarkDataError(f"{where}: no id ({prefix}{wanted}); pass --id-key to name the field")
    value = record[keys[0]]
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a spreadsheet's 101.0
    return str(value)


def _text(where: str, reply) -> str:
    if reply is None:
        return ""
    if not isinstance(reply, str):
        raise BenchmarkDataError(f"{where}: the reply should be text, got {reply!r}")
    return reply


def _delimited_rows(path: str, delimiter: str) -> list[tuple[str, dict]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        return [(f"{path}:{reader.line_num}", dict(row)) for row in reader]


# --- a minimal .xlsx reader (the first sheet), so no spreadsheet library is needed ----------------

_NS = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}


def _xlsx_rows(path: str) -> list[tuple[str, dict]]:
    try:
        with zipfile.ZipFile(path) as book:
            shared = _shared_strings(book)
            sheet = ElementTree.fromstring(book.read(_first_sheet(book)))
    except (zipfile.BadZipFile, KeyError, ElementTree.ParseError) as e:
        raise BenchmarkDataError(f"{path}: not a readable .xlsx file ({e})") from None
    table = []
    for row in sheet.iterfind("m:sheetData/m:row", _NS):
        cells = {_column(c.get("r")): _cell_value(c, shared) for c in row.iterfind("m:c", _NS)}
        table.append((int(row.get("r")), cells))
    if not table:
        raise BenchmarkDataError(f"{path}: the first sheet is empty")
    _, header = table[0]
    names = {column: str(name) for column, name in header.items()}
    return [(f"{path}: row {number}", {name: cells.get(column) for column, name in names.items()})
            for number, cells in table[1:]]


def _first_sheet(book: zipfile.ZipFile) -> str:
    sheets = sorted(n for n in book.namelist() if n.startswith("xl/worksheets/sheet") and n.endswith(".xml"))
    if not sheets:
        raise KeyError("no worksheet")
    return sheets[0]


def _shared_strings(book: zipfile.ZipFile) -> list[str]:
    if "xl/sharedStrings.xml" not in book.namelist():
        return []
    root = ElementTree.fromstring(book.read("xl/sharedStrings.xml"))
    return ["".join(t.text or "" for t in item.iter(f"{{{_NS['m']}}}t")) for item in root.iterfind("m:si", _NS)]


def _column(reference: str) -> str:
    return "".join(ch for ch in reference if ch.isalpha())


def _cell_value(cell, shared: list[str]):
    kind = cell.get("t")
    if kind == "inlineStr":
        return "".join(t.text or "" for t in cell.iter(f"{{{_NS['m']}}}t"))
    value = cell.findtext("m:v", default=None, namespaces=_NS)
    if value is None:
        return None
    if kind == "s":
        return shared[int(value)]
    if kind in ("str", "e"):
        return value
    if kind == "b":
        return value == "1"
    number = float(value)
    return int(number) if number.is_integer() else number
