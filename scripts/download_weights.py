#!/usr/bin/env python
"""Download and verify the weights TinyGPT-V needs, into weights/ (what the configs point at).

    python scripts/download_weights.py                 # stage 4: EVA, BLIP-2 Q-Former, Phi-2, stage-4 model
    python scripts/download_weights.py --stage 3       # the same with the released stage-3 checkpoint
    python scripts/download_weights.py --stage base    # only what training from scratch needs
    python scripts/download_weights.py --stage all --dir /data/weights
    python scripts/download_weights.py --list          # what would be fetched, from where, how big

Sources, sizes and sha256 sums: tinygpt_v/weights_manifest.json. Hub files honour the Hugging
Face cache ($HF_HOME, $HF_HUB_CACHE), $HF_ENDPOINT and $HF_HUB_OFFLINE=1; weights/ gets links to
the cached files. LAVIS files are resumed after an interruption (run the command again). Nothing
incomplete or unverified is ever left under its final name. Offline, the tool lists what to copy
where by hand. Exit status: 0 all in place, 1 a failure (e.g. checksum), 2 files missing offline.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing


def main(argv: list[str] | None = None) -> int:
    from tinygpt_v.checkpoints.download import DownloadError, convert_old_phi, fetch, load_manifest, plan, report
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="4",
                        help="1, 2, 3, 4 (the base files + that released checkpoint), base, all, or entry names "
                             "separated by commas (default 4)")
    parser.add_argument("--dir", default="weights", help="where the files go (default weights/)")
    parser.add_argument("--manifest", help="another manifest file (default: the packaged one)")
    parser.add_argument("--offline", action="store_true", help="use only local files and the Hub cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--convert", action="store_true",
                        help="also convert an old-layout Phi-2 folder now (loading does it by itself otherwise)")
    parser.add_argument("--list", action="store_true", help="print the files, sources and sizes; fetch nothing")
    parser.add_argument("--revision", action="append", default=[], metavar="ENTRY=REV",
                        help="another Hub revision for an entry, e.g. phi2=main (default: the manifest's pin)")
    args = parser.parse_args(argv)
    try:
        manifest = load_manifest(args.manifest)
        for override in args.revision:
            entry, _, revision = override.partition("=")
            if manifest["files"].get(entry, {}).get("kind") != "hub" or not revision:
                raise DownloadError(f"--revision {override}: expected HUB_ENTRY=REVISION with HUB_ENTRY one of "
                                    f"{sorted(k for k, v in manifest['files'].items() if v['kind'] == 'hub')}")
            manifest["files"][entry]["revision"] = revision
        specs = plan(manifest, args.stage, args.dir)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.list:
        return list_files(manifest, specs)
    outcomes = [fetch(spec, offline=args.offline, progress=not args.no_progress) for spec in specs]
    status = report(outcomes, args.manifest or "tinygpt_v/weights_manifest.json")
    if args.convert and status == 0:
        phi_dirs = {spec.dest.parent for spec in specs if spec.filename == "config.json"}
        for folder in sorted(phi_dirs):
            print(convert_old_phi(folder))
    return status


def list_files(manifest: dict, specs) -> int:
    entries = dict.fromkeys(spec.entry for spec in specs)
    total = 0
    for name in entries:
        entry = manifest["files"][name]
        approx = entry.get("approx_bytes") or 0
        total += approx
        source = entry.get("url") or f"hf://{entry['repo_id']}@{entry.get('revision', 'main')}"
        dest = entry["dest"] if entry["dest"] != "." else ", ".join(entry.get("files", {}))
        print(f"{name:14} ~{approx / 1e9:5.2f} GB  {source}\n{'':14} -> {dest}   ({entry.get('what', '')})")
    print(f"total ~{total / 1e9:.1f} GB (estimates from parameter counts; the tool prints exact sizes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
