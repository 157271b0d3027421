#!/usr/bin/env python
"""Collect every run under one or more directories into one table (CSV and/or markdown).

A run is a directory holding ``summary.json`` (written by ``midtrain pretrain`` / ``finetune`` at the
end) or ``metrics.jsonl``. Per run the table has: run (path relative to the root), step, max_steps,
tokens_seen, tokens per type, and the last value of every validation loss in ``metrics.jsonl``
(``val/<set>/loss``). Evaluate CSVs (``midtrain evaluate``; any ``*.csv`` with a ``loss`` column)
are appended as further rows.

    python util_scripts/collect_runs.py out/ --csv runs.csv --markdown runs.md
    python util_scripts/collect_runs.py out/pythia-70m          # markdown to stdout
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def last_val_losses(metrics: Path) -> dict[str, float]:
    """The last logged value of every ``val/<set>/loss`` in a metrics.jsonl."""
    out: dict[str, float] = {}
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill; the others are fine
        for key, value in record.items():
            if key.startswith("val/") and key.endswith("/loss") and isinstance(value, (int, float)):
                out[key] = float(value)
    return out


def run_row(run: Path, root: Path) -> dict:
    row: dict = {"run": str(run.relative_to(root)) or ".", "source": "run"}
    summary = run / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        for key in ("step", "max_steps", "tokens_seen", "final_checkpoint"):
            if key in s:
                row[key] = s[key]
        for t, n in (s.get("tokens_by_type") or {}).items():
            row[f"tokens/{t}"] = n
    else:
        row["step"] = "unfinished"
    if (run / "metrics.jsonl").is_file():
        row.update(last_val_losses(run / "metrics.jsonl"))
    return row


def eval_rows(path: Path, root: Path) -> list[dict]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "loss" not in reader.fieldnames:
            return []
        return [{"run": str(path.relative_to(root)), "source": "evaluate", **r} for r in reader]


def collect(roots: list[Path]) -> list[dict]:
    rows: list[dict] = []
    for root in roots:
        runs = sorted({p.parent for pat in ("summary.json", "metrics.jsonl") for p in root.rglob(pat)
                       if not any(part.startswith((".tmp-", ".old-")) for part in p.parts)})
        rows += [run_row(r, root) for r in runs]
        for csv_path in sorted(root.rglob("*.csv")):
            if "logs" not in csv_path.parts:  # litgpt's CSV logger output is not an evaluate table
                rows += eval_rows(csv_path, root)
    return rows


def columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def to_markdown(rows: list[dict]) -> str:
    cols = columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("roots", nargs="+", type=Path, help="Directories to search for runs (recursively).")
    parser.add_argument("--csv", type=Path, help="Write the table as CSV here.")
    parser.add_argument("--markdown", type=Path, help="Write the table as markdown here (default: stdout).")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.roots if not r.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(missing)}")
    rows = collect(args.roots)
    if not rows:
        print(f"no runs (summary.json / metrics.jsonl) or evaluate CSVs under {', '.join(map(str, args.roots))}",
              file=sys.stderr)
        return 1
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns(rows))
            writer.writeheader()
            writer.writerows(rows)
    md = to_markdown(rows)
    if args.markdown:
        args.markdown.write_text(md)
    elif not args.csv:
        sys.stdout.write(md)
    print(f"{len(rows)} rows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
