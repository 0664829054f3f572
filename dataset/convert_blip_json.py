"""BLIP's filtered caption lists (`laion_synthetic_filtered_large.json`,
`ccs_synthetic_filtered_large.json`: [{"url", "caption"}, ...]) -> a TSV for img2dataset.

    python dataset/convert_blip_json.py ccs_synthetic_filtered_large.json ccs_synthetic_filtered_large.tsv

Tabs and newlines inside captions are replaced by spaces so every row stays one row.
"""
from __future__ import annotations

import argparse
import csv
import json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="the BLIP json list")
    parser.add_argument("out", help="the TSV to write (columns url, caption)")
    args = parser.parse_args(argv)
    with open(args.source, encoding="utf-8") as f:
        rows = json.load(f)
    with open(args.out, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(["url", "caption"])
        for n, row in enumerate(rows):
            if "url" not in row or "caption" not in row:
                raise ValueError(f"{args.source}: record {n} lacks url or caption: {row}")
            writer.writerow([row["url"], " ".join(str(row["caption"]).split())])
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
