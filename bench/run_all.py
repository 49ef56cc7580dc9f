"""`make bench`: run every benchmark in turn, then print the table of ratios beside their targets.

Each script also runs alone (``python bench/<name>.py``). ``--only overhead,lora_vs_full`` picks some;
``--tiny`` runs them at toy sizes (the smoke test). The table goes to stdout and ``<out>/summary.md``;
a full run (every benchmark, not ``--tiny``, none failed) also regenerates docs/performance.md
(``bench/make_docs.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from common import parse_args

HERE = Path(__file__).resolve().parent
# Cheapest first, so a failure shows early; the default run and torch.compile take longest.
BENCHMARKS = ("overhead", "adapter_inference", "lora_vs_full", "peers", "feature_cache", "check_cache",
              "checkpoints", "data_pipeline", "text", "cost_growth", "channels_last", "default_run", "speed_options")


def table(results: list[dict]) -> str:
    lines = ["| benchmark | measured | target | met | details |", "|---|---|---|---|---|"]
    for result in results:
        for r in result["rows"]:
            met = {True: "yes", False: "**no**", None: "–"}[r["met"]]
            lines.append(f"| {r['metric']} | {r['value']:.3g} | {r['target'] or '–'} | {met} | {r['detail']} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument("--only", default="", help="comma-separated names"))
    chosen = [b for b in BENCHMARKS if not args.only or b in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - set(BENCHMARKS)
    if unknown:
        sys.exit(f"bench: --only {','.join(sorted(unknown))}: no such benchmark. Choose from {', '.join(BENCHMARKS)}")
    started = time.perf_counter()
    failed, results = [], []
    for name in chosen:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, str(HERE / f"{name}.py"), "--out", str(args.out)] + (["--tiny"] if args.tiny else [])
        # The scripts' own progress (Lightning bars, warnings) is noise here; keep it for a failure.
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            failed.append(name)
            print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
            continue
        results.append(json.loads((args.out / f"{name}.json").read_text()))
        print("\n".join(line for line in proc.stdout.splitlines() if line.startswith(f"[{name}]")))
        print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    text = table(results)
    total = time.perf_counter() - started
    (args.out / "summary.md").write_text(text + f"\n\nTotal {total / 60:.1f} min.\n")
    print("\n" + text + f"\n\nTotal {total / 60:.1f} min; results in {args.out}/")
    # docs/performance.md shows a full measurement only: every benchmark, real sizes, none failed.
    if not args.tiny and not failed and chosen == list(BENCHMARKS):
        from make_docs import write_doc

        print(f"docs: regenerated {write_doc(args.out)}")
    if failed:
        sys.exit(f"bench: {', '.join(failed)} failed (output above)")


if __name__ == "__main__":
    main()
