"""Sums an Nsight Compute ``--csv`` report by kernel, for reading runs like session 20's without a script each time:

    python3 benchmarks/ncu_summary.py results/ncu-forward-default.csv
    python3 benchmarks/ncu_summary.py default.csv packed.csv --by name,grid --json summary.json

Input: what ``ncu --csv --metrics METRIC ... python3 ...`` prints (the program's own output and ncu's ``==PROF==`` lines
may be mixed in: only the quoted CSV lines are read). ``--metric`` picks the metric (default gpu__time_duration.sum;
nanoseconds are shown as microseconds). Kernels are grouped by name (the text before its argument list; MLX's custom
kernels carry their template values in it) or, with ``--by name,grid``, by name and grid size. ``--skip N`` leaves out
each group's first N launches (first-call effects). One file: per group the launches, median, min, max and total, and
its share of the file's total. Several files: per group each file's launches and total side by side, and the last
file's total less the first's, so two forwards (e.g. ``models.py --flashdiff blocks`` against ``blocks-packed``)
compare kernel by kernel. Totals and shares mean something only for additive metrics, such as durations.
"""

import argparse
import csv
import statistics
import sys
from pathlib import Path


TIME_UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}


def read_report(path: Path, metric: str, by: tuple, skip: int = 0) -> tuple[dict, str]:
    """{group: [values in launch order]} of `metric` in an ncu CSV report, and the unit they are in: times in
    microseconds whatever unit each row has (ncu may scale a unit per row), other metrics as reported."""
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.startswith('"')]
    if not lines:
        raise SystemExit(f"{path}: no CSV lines (was ncu run with --csv?)")
    rows = csv.DictReader(lines)
    missing = {"Kernel Name", "Grid Size", "Metric Name", "Metric Unit", "Metric Value"} - set(rows.fieldnames or ())
    if missing:
        raise SystemExit(f"{path}: not an ncu --csv report (no column {sorted(missing)})")
    groups, unit = {}, ""
    for row in rows:
        if row["Metric Name"] != metric:
            continue
        factor = TIME_UNITS.get(row["Metric Unit"])
        unit = "us" if factor else row["Metric Unit"]
        name = row["Kernel Name"].split("(", 1)[0].strip()
        key = (name, row["Grid Size"]) if "grid" in by else (name,)
        groups.setdefault(key, []).append(float(row["Metric Value"].replace(",", "")) * (factor or 1.0))
    if not groups:
        raise SystemExit(f"{path}: no rows of metric {metric!r}")
    return {key: values[skip:] for key, values in groups.items() if values[skip:]}, unit


def summarize(paths: list, metric: str = "gpu__time_duration.sum", by: tuple = ("name",), skip: int = 0) -> dict:
    """Per file: {group label: launches, median, min, max, total} in display units, plus the file's total."""
    out = {"metric": metric, "files": []}
    for path in paths:
        groups, unit = read_report(path, metric, by, skip)
        stats = {" @ ".join(key): dict(launches=len(v), median=statistics.median(v), min=min(v), max=max(v), total=sum(v))
                 for key, v in groups.items()}
        out["files"].append(dict(path=str(path), unit=unit, groups=stats,
                                 total=sum(g["total"] for g in stats.values())))
    return out


def render(summary: dict) -> str:
    files = summary["files"]
    unit = files[0]["unit"]
    if len(files) == 1:
        f = files[0]
        lines = [f"| kernel | launches | median {unit} | min | max | total {unit} | share |", "|---|---|---|---|---|---|---|"]
        for label, g in sorted(f["groups"].items(), key=lambda kv: -kv[1]["total"]):
            lines.append(f"| {label} | {g['launches']} | {g['median']:.1f} | {g['min']:.1f} | {g['max']:.1f} | "
                         f"{g['total']:.1f} | {g['total'] / f['total']:.1%} |")
        lines.append(f"| all | {sum(g['launches'] for g in f['groups'].values())} | | | | {f['total']:.1f} | 100% |")
        return "\n".join(lines)
    labels = sorted({label for f in files for label in f["groups"]},
                    key=lambda label: -max(f["groups"].get(label, {"total": 0})["total"] for f in files))
    head = " | ".join(f"{Path(f['path']).name}: launches, total {unit}" for f in files)
    lines = [f"| kernel | {head} | last - first |", "|---" * (len(files) + 2) + "|"]
    for label in labels:
        cells = [f"{f['groups'][label]['launches']}, {f['groups'][label]['total']:.1f}" if label in f["groups"] else "-"
                 for f in files]
        delta = files[-1]["groups"].get(label, {"total": 0.0})["total"] - files[0]["groups"].get(label, {"total": 0.0})["total"]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {delta:+.1f} |")
    lines.append("| all | " + " | ".join(f"{f['total']:.1f}" for f in files) + f" | {files[-1]['total'] - files[0]['total']:+.1f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--metric", default="gpu__time_duration.sum")
    ap.add_argument("--by", default="name", choices=["name", "name,grid"])
    ap.add_argument("--skip", type=int, default=0, help="leave out each group's first N launches")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    for path in args.reports:
        if not path.is_file():
            raise SystemExit(f"{path}: no such file")
    if args.skip < 0:
        raise SystemExit(f"--skip must be 0 or more, got {args.skip}")
    summary = summarize(args.reports, args.metric, tuple(args.by.split(",")), args.skip)
    print(render(summary))
    if args.json:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import write_json

        write_json(args.json, summary)


if __name__ == "__main__":
    main()
