"""The evaluation summary: `summary.json` (every metric) and `summary.md` (the headline table)."""
from __future__ import annotations

import json
from pathlib import Path


def write_summary(scores: dict[str, dict], output_dir: Path, model_name: str, scorings: list[str]) -> dict:
    """scores: benchmark -> {"samples": n, "<scoring>": {metric: percent}}. Prints the table."""
    summary = {"model": model_name, "scorings": scorings, "benchmarks": scores}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = markdown_table(scores, scorings)
    (output_dir / "summary.md").write_text(table)
    print(table)
    return summary


def markdown_table(scores: dict[str, dict], scorings: list[str]) -> str:
    """One row per benchmark and headline metric; breakdowns ("metric/part") stay in the JSON."""
    lines = ["| benchmark | metric | " + " | ".join(scorings) + " | samples |",
             "|---|---|" + "---:|" * len(scorings) + "---:|"]
    for name, result in scores.items():
        # A scoring the benchmark does not offer (GQA has no "evalai") is absent: shown as "-".
        metrics = dict.fromkeys(m for s in scorings for m in result.get(s, {}) if "/" not in m)
        for metric in metrics:
            values = [f"{result[s][metric]:.2f}" if metric in result.get(s, {}) else "-" for s in scorings]
            lines.append(f"| {name} | {metric} | " + " | ".join(values) + f" | {result['samples']} |")
    return "\n".join(lines) + "\n"
