"""Method-comparison summary of a folder of runs: ``summary.csv``, ``summary.md`` and ``summary.png``.

``python -m ftlab.report DIR`` (or ``ftlab report DIR``) rebuilds it from any folder of run
directories; the sweep callback (:mod:`ftlab.sweep_summary`) writes the same into every multirun's
sweep directory. One row per run: method, model, the overrides that differ between runs, trainable
parameters, test accuracy/F1, fit time, peak memory and artifact size. Failed and incomplete runs are
rows too, with their status. Cross-validated runs show mean ± std over their folds. Runs that differ
only by seed (``-m seed=0,1,2``) are one row: mean ± std, n and a 95 % interval (:mod:`ftlab.seeds`).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ftlab.errors import UserError
from ftlab.fileio import atomic_open, write_text
from ftlab.report_plot import plot_summary
from ftlab.runs import RunRecord, differing_keys, load_runs
from ftlab.seeds import aggregate

SUMMARY_FILES = ("summary.csv", "summary.md", "summary.png")
# The selection metric: runs are ranked on validation, never on the test set.
SELECT_METRIC = "val/acc_best"
CSV_COLUMNS = (
    "run", "status", "method", "model", "overrides", "params_trainable", "params_trainable_pct",
    "val/acc_best", "val/acc_best_std", "test/acc", "test/acc_std", "n", "test/acc_ci95_low", "test/acc_ci95_high",
    "seeds", "test/f1", "test/f1_std", "fit_seconds", "peak_rss_mb", "artifact_bytes", "folds", "test_on_val", "error", "path",
)


@dataclass
class Row:
    run: RunRecord
    name: str
    overrides: list[str]  # only the ones that differ between runs (method has its own column)
    index: int = 0  # 1-based position in the table: the plot's labels refer to rows by it

    @property
    def tag(self) -> str:
        return f"#{self.index} {self.run.method}"

    @property
    def short_overrides(self) -> list[str]:
        return [short_override(o) for o in self.overrides]

    @property
    def label(self) -> str:
        return " ".join([self.run.method, *self.short_overrides])

    def get(self, key: str) -> Any:
        return self.run.metrics.get(key)


def short_override(override: str) -> str:
    """``model.lr=0.0008468008575248334`` -> ``model.lr=0.000847`` (display only; the CSV keeps them exact)."""
    key, sep, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    return f"{key}{sep}{number:.3g}" if len(value) > 6 and "." in value else override


def group_seeds(runs: list[RunRecord]) -> list[tuple[RunRecord, int]]:
    """(record, number of runs in it): completed runs that differ only by ``seed`` merged into one record.

    A group needs two or more runs with distinct seeds (two runs of the same command stay apart);
    failed, incomplete and cross-validated runs are never merged. The merged record's metrics are
    :func:`ftlab.seeds.aggregate`'s, its overrides the shared ones plus ``seed=<a,b,c>``; it stands where
    its first run stood.
    """
    groups: dict[tuple, list[RunRecord]] = {}
    for i, run in enumerate(runs):
        if not run.ok or run.metrics.get("folds"):
            groups[("single", i)] = [run]
            continue
        rest = {k: v for k, v in run.override_dict().items() if k != "seed"}
        groups.setdefault((run.method, run.model, tuple(sorted(rest.items()))), []).append(run)
    out: list[tuple[RunRecord, int]] = []
    for members in groups.values():
        seeds = [m.override_dict().get("seed") for m in members]
        if len(members) < 2 or len(set(seeds)) < len(seeds):
            out += [(m, 1) for m in members]
            continue
        first = members[0]
        metrics = aggregate([m.metrics for m in members], seeds=[s if s is not None else "default" for s in seeds])
        overrides = [o for o in first.overrides if parse_key(o) != "seed"]
        overrides.append("seed=" + ",".join(str(s) for s in metrics["seeds"]))
        out.append((RunRecord(first.path, "ok", metrics, overrides), len(members)))
    return out


def parse_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def build_rows(runs: list[RunRecord]) -> list[Row]:
    records = group_seeds(runs)
    keys = [k for k in differing_keys([r for r, _ in records]) if k != "method"]
    rows = []
    for run, n in records:
        overrides = run.override_dict()
        shown = [f"{k}={overrides[k]}" for k in keys if k in overrides]
        name = run.path.name if n == 1 else f"{run.path.name} +{n - 1}"
        rows.append(Row(run, name, shown, index=len(rows) + 1))
    return rows


def best_row(rows: list[Row], metric: str = SELECT_METRIC) -> Row | None:
    scored = [r for r in rows if r.run.ok and isinstance(r.get(metric), (int, float)) and not math.isnan(r.get(metric))]
    return max(scored, key=lambda r: r.get(metric)) if scored else None


# -- formatting ----------------------------------------------------------------------------------
def _num(value: Any, digits: int) -> str:
    return "" if not isinstance(value, (int, float)) else f"{value:.{digits}f}"


def _mean_std(row: Row, key: str, digits: int = 4) -> str:
    mean, std = row.get(key), row.get(f"{key}_std")
    if not isinstance(mean, (int, float)):
        return ""
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if isinstance(std, (int, float)) else f"{mean:.{digits}f}"


def human_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return ""


def _interval(row: Row) -> str:
    low, high = row.get("test/acc_ci95_low"), row.get("test/acc_ci95_high")
    return f"{low:.4f} – {high:.4f}" if isinstance(low, (int, float)) and isinstance(high, (int, float)) else ""


def _status(row: Row) -> str:
    status = row.run.status
    return f"{status}: {row.run.error}" if row.run.error and status != "ok" else status


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[Row], title: str) -> str:
    header = ["#", "run", "method", "model", "overrides", "trainable", "% trainable", "val/acc_best",
              "test/acc", "n", "test/acc 95 % CI", "test/f1", "fit s", "peak RSS MB", "artifact", "status"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            str(r.index), r.name, r.run.method, r.run.model, " ".join(r.short_overrides),
            f"{r.get('params_trainable'):,}" if isinstance(r.get("params_trainable"), int) else "",
            _num(r.get("params_trainable_pct"), 2), _mean_std(r, "val/acc_best"), _mean_std(r, "test/acc"),
            str(r.get("n") or ""), _interval(r), _mean_std(r, "test/f1"), _num(r.get("fit_seconds"), 1), _num(r.get("peak_rss_mb"), 0),
            human_bytes(r.get("artifact_bytes")), _status(r),
        ]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    notes = []
    best = best_row(rows)
    if best is not None:
        notes.append(f"Best by {SELECT_METRIC} (validation, never test): **{best.name}** "
                     f"({best.label}) = {best.get(SELECT_METRIC):.4f}.")
    if any(r.get("test_on_val") for r in rows):
        notes.append("Runs without a test/ split report test metrics on their validation split.")
    if any(r.get("seeds") for r in rows):
        notes.append("Runs that differ only by seed are one row (`seed=a,b,c`, n runs): mean ± sample standard "
                     "deviation over the seeds; the 95 % CI of test/acc is Student's t, mean ± t(0.975, n−1)·std/√n; "
                     "fit s is the mean, peak RSS the largest.")
    if any(r.get("folds") for r in rows):
        notes.append("Cross-validated runs: mean ± sample standard deviation over folds; fit s is the sum.")
    not_ok = [r for r in rows if not r.run.ok]
    if not_ok:
        notes.append(f"{len(not_ok)} of {len(rows)} runs have no results: "
                     + "; ".join(f"{r.name} ({_status(r)})" for r in not_ok) + ".")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def csv_rows(rows: list[Row]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        values = {
            "run": r.name, "status": r.run.status, "method": r.run.method, "model": r.run.model,
            "overrides": " ".join(r.overrides), "error": r.run.error or "", "path": str(r.run.path),
        }
        for key in CSV_COLUMNS:
            if key not in values:
                value = r.get(key)
                values[key] = "" if value is None else " ".join(map(str, value)) if isinstance(value, list) else value
        out.append(values)
    return out


def write_summary(
    roots: Path | Sequence[Path], out_dir: Path | None = None, title: str | None = None
) -> tuple[list[Row], str]:
    """Collect the runs under ``roots`` and write the three summary files into ``out_dir``.

    ``out_dir`` defaults to the folder when there is one; with several it is required.
    """
    roots = [Path(r).expanduser() for r in ([roots] if isinstance(roots, (str, Path)) else roots)]
    runs = []
    for root in roots:
        if not root.is_dir():
            raise UserError(f"{root}: no such directory")
        found = load_runs(root)
        if not found:
            raise UserError(f"{root}: no run directories (folders holding metrics.json or .hydra/)")
        runs += found
    if out_dir is None and len(roots) > 1:
        raise UserError("several folders: say where the summary goes with --out DIR")
    out_dir = Path(out_dir or roots[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = build_rows(runs)
    title = title or f"ftlab runs in {', '.join(r.name for r in roots)}"
    text = markdown_table(rows, title)
    optuna = roots[0] / "optimization_results.yaml"
    if len(roots) == 1 and optuna.is_file():
        result = yaml.safe_load(optuna.read_text()) or {}
        text += (f"- Optuna best (optimization_results.yaml): value {result.get('best_value')}, "
                 f"params {result.get('best_params')}\n")
    write_text(out_dir / "summary.md", text)

    with atomic_open(out_dir / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        writer.writerows(csv_rows(rows))
    plot_summary(rows, out_dir / "summary.png", title)
    return rows, text


def main(argv: list[str] | None = None) -> int:
    """``ftlab report DIR [DIR ...]``: rebuild summary.{csv,md,png} from folders of run directories."""
    parser = argparse.ArgumentParser(
        prog="ftlab report",
        description="Summarise a folder of ftlab runs (a sweep directory, outputs/runs, ...): "
        "writes summary.csv, summary.md and summary.png.",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="folder holding run directories (searched recursively)")
    parser.add_argument("--out", default=None, help="where to write the summary files (default: DIR, if only one)")
    args = parser.parse_args(argv)
    try:
        rows, text = write_summary([Path(d) for d in args.dirs], Path(args.out) if args.out else None)
    except UserError as exc:
        print(f"ftlab: error: {exc}", file=sys.stderr)
        return 1
    print(text, end="")
    out = Path(args.out or args.dirs[0])
    print(f"wrote {', '.join(str(out / f) for f in SUMMARY_FILES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
