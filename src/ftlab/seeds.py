"""Runs that differ only by seed, as one result: mean, sample standard deviation, n and a 95 % interval.

The interval is Student's t: mean ± t(0.975, n − 1) · std / √n over the n seeds (n ≥ 2), the usual
small-sample interval for a mean; with 3 seeds t is 4.30, so it is wide, honestly. Used by the sweep
summary (``-m seed=0,1,2``) and by ``experiment=compare_tuned``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

# Copied from the first run of a group: the same for every seed.
SHARED_KEYS = ("method", "model", "data", "num_classes", "params_total", "params_trainable",
               "params_trainable_pct", "weight_source", "test_on_val", "artifact", "split_sizes")


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def t_quantile(df: int, q: float = 0.975) -> float:
    from scipy.stats import t

    return float(t.ppf(q, df))


def interval(values: Sequence[float]) -> dict[str, float | int | None]:
    """mean, std (sample; None for one value), n, ci95_low/ci95_high (Student's t; None below 2 values)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "ci95_low": None, "ci95_high": None}
    mean = statistics.fmean(values)
    if n == 1:
        return {"mean": mean, "std": None, "n": 1, "ci95_low": None, "ci95_high": None}
    std = statistics.stdev(values)
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "ci95_low": mean - half, "ci95_high": mean + half}


def aggregate(results: Sequence[dict[str, Any]], seeds: Sequence[Any] | None = None) -> dict[str, Any]:
    """One metrics dict for several seeds of one configuration.

    Every numeric ``val/*`` and ``test/*`` metric becomes its mean, with ``<key>_std``; ``test/acc`` also gets
    ``test/acc_ci95_low``/``_high``. ``n`` is the number of runs, ``seeds`` their seeds. Fit time and artifact
    size are means, peak memory the largest of the runs (what a user must have).
    """
    if not results:
        raise ValueError("aggregate() needs at least one run's metrics")
    first = results[0]
    out: dict[str, Any] = {k: first[k] for k in SHARED_KEYS if k in first}
    keys = dict.fromkeys(k for r in results for k in r
                         if k.startswith(("val/", "test/")) and not k.endswith(("_std", "_ci95_low", "_ci95_high")))
    for key in keys:
        values = [v for v in (_number(r.get(key)) for r in results) if v is not None]
        if not values:
            continue
        stats = interval(values)
        out[key] = stats["mean"]
        out[f"{key}_std"] = stats["std"]
        if key == "test/acc":
            out["test/acc_ci95_low"], out["test/acc_ci95_high"] = stats["ci95_low"], stats["ci95_high"]
    for key, reduce in (("fit_seconds", statistics.fmean), ("artifact_bytes", statistics.fmean),
                        ("peak_rss_mb", max), ("peak_gpu_mb", max)):
        values = [v for v in (_number(r.get(key)) for r in results) if v is not None]
        if values:
            out[key] = round(reduce(values), 2)
    out["n"] = len(results)
    if seeds is not None:
        out["seeds"] = list(seeds)
    return out
