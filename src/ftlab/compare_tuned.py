"""``experiment=compare_tuned``: tune every method on validation, retrain the best with several seeds, compare.

``python -m ftlab experiment=compare_tuned [data=...] [model=...] [tune.trials=N ...]`` runs this in one
process. For each method of ``tune.methods``:

1. an Optuna TPE study (ask/tell) over ``tune.space.<method>``: ``tune.trials`` runs of ``tune.epochs``
   epochs, each scored by ``tune.metric`` (``val/acc_best``: validation, never test);
2. the best trial's values retrained with ``tune.seeds`` seeds (``seed+1`` ... ``seed+K``, not the seed the
   search used, so the test numbers are not those of the selected run) and tested once each.

Every trial and seed is a complete run (:func:`ftlab.train.run` on a config composed from the command
line's overrides, the method and the values) in its own directory, ``<method>/trial_<i>/`` or
``<method>/seed_<s>/``, with ``.hydra/`` so ``ftlab eval``/``report`` work on it. A run that raises is
recorded (``error.txt``, a FAIL in the study, a row note) and the comparison goes on. After each method,
and at the end, the comparison directory gets ``summary.csv``, ``summary.md`` (per method: the best
values, test accuracy mean ± std with a Student-t 95 % interval over the seeds, trainable parameters,
fit time, peak memory, artifact size; and three recommendation lines), ``pareto.png`` and
``comparison.json``.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from ftlab.config import CONFIG_DIR, compose_config
from ftlab.errors import RunInterrupted, UserError, suggest, user_message
from ftlab.fileio import atomic_open, write_json, write_text
from ftlab.report import human_bytes
from ftlab.runs import ERROR_FILE
from ftlab.seeds import aggregate

log = logging.getLogger(__name__)

SPEC_KEYS = {"low", "high", "log", "relative"}
# Overrides the comparison sets itself in every run it starts.
OWN_KEYS = ("experiment", "tune", "method", "seed", "trainer.max_epochs", "test", "hydra", "hparams_search")
CSV_COLUMNS = (
    "method", "status", "best_params", "best_val", "trials_ok", "trials", "n", "seeds", "test/acc", "test/acc_std",
    "test/acc_ci95_low", "test/acc_ci95_high", "val/acc_best", "val/acc_best_std", "test/f1", "test/f1_std",
    "params_trainable", "params_trainable_pct", "fit_seconds", "tune_seconds", "peak_rss_mb", "peak_gpu_mb",
    "artifact_bytes", "error", "path",
)
# "Within one point of the best": one percentage point of accuracy.
ONE_POINT = 0.01
LOW_PARAMS_PCT = 1.0


# -- the configuration -------------------------------------------------------------------------------
def method_options() -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml"))


def _flatten(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{model: {lr: spec}}`` and ``{model.lr: spec}`` alike -> ``{"model.lr": spec}``; a spec is a list or a
    mapping with low/high."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and not (set(value) & {"low", "high"}):
            out.update(_flatten(value, full + "."))
        else:
            out[full] = value
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_spec(where: str, spec: Any) -> None:
    """One search dimension: a non-empty list of choices or ``{low, high, log, relative}``."""
    if isinstance(spec, list):
        if not spec:
            raise UserError(f"{where}=[]: must list at least one choice")
        return
    if not isinstance(spec, dict):
        raise UserError(f"{where}={spec!r}: must be a list of choices or {{low, high, log, relative}}")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (keys: low, high, log, relative)")
    low, high = spec.get("low"), spec.get("high")
    if not (_number(low) and _number(high) and low <= high):
        raise UserError(f"{where}: low={low!r}, high={high!r}: must be numbers with low <= high")
    for flag in ("log", "relative"):
        if not isinstance(spec.get(flag, False), bool):
            raise UserError(f"{where}.{flag}={spec[flag]!r}: must be true or false")
    if spec.get("log") and low <= 0:
        raise UserError(f"{where}: low={low!r}: a log scale needs low > 0")


def check_tune(cfg: DictConfig) -> dict[str, Any]:
    """The ``tune`` node as plain Python, checked (one line naming the key); its scalars are in
    :data:`ftlab.validate.CHECKS`."""
    from ftlab.validate import validate

    validate(cfg)  # the shared keys, and tune.trials/epochs/seeds/...
    tune = OmegaConf.to_container(cfg.tune, resolve=True)
    methods = tune.get("methods")
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise UserError(f"tune.methods={methods!r}: must be a non-empty list of methods, e.g. [lora,full]")
    if len(set(methods)) < len(methods):
        raise UserError(f"tune.methods={methods}: lists a method twice")
    options = method_options()
    space = tune.get("space") or {}
    if not isinstance(space, dict):
        raise UserError(f"tune.space={space!r}: must map each method to its search space")
    for method in methods:
        if method not in options:
            raise UserError(f"tune.methods: {method}: no such method. Options: {', '.join(options)}."
                            f"{suggest(method, options)}")
        if not isinstance(space.get(method), dict) or not space[method]:
            raise UserError(f"tune.space.{method}: no search space for method={method} "
                            "(add one beside the others in conf/experiment/compare_tuned.yaml)")
        flat = _flatten(space[method])
        for key, spec in flat.items():
            check_spec(f"tune.space.{method}.{key}", spec)
        space[method] = flat
    tune["methods"], tune["space"] = methods, space
    if tune.get("final_epochs") is None:
        tune["final_epochs"] = tune["epochs"]
    return tune


def base_overrides(cfg: DictConfig) -> list[str]:
    """The command line's overrides that every run of the comparison shares (data, model, trainer knobs ...)."""
    task = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    keep = []
    for override in task:
        key = override.partition("=")[0].lstrip("+~")
        if any(key == k or key.startswith(k + ".") or key.startswith(k + "/") for k in OWN_KEYS):
            continue
        keep.append(override)
    return keep


def _value(value: Any) -> str:
    """A Python value as a Hydra override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def space_bounds(method: str, space: dict[str, Any], probe: DictConfig) -> dict[str, Any]:
    """Resolve ``relative`` bounds against the method's composed defaults; every key must exist there."""
    resolved: dict[str, Any] = {}
    for key, spec in space.items():
        where = f"tune.space.{method}.{key}"
        default = OmegaConf.select(probe, key, default="__absent__")
        if isinstance(default, str) and default == "__absent__":
            raise UserError(f"{where}: method={method} has no key {key}")
        if isinstance(spec, dict) and spec.get("relative"):
            if not _number(default) or default <= 0:
                raise UserError(f"{where}: relative bounds need a default > 0 (method={method} has {default!r})")
            spec = {**spec, "low": spec["low"] * default, "high": spec["high"] * default, "relative": False}
        resolved[key] = spec
    return resolved


def suggest_values(trial: Any, space: dict[str, Any]) -> dict[str, Any]:
    values = {}
    for key, spec in space.items():
        if isinstance(spec, list):
            values[key] = trial.suggest_categorical(key, spec)
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int):
            values[key] = trial.suggest_int(key, spec["low"], spec["high"], log=bool(spec.get("log")))
        else:
            values[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
    return values


# -- running one configuration -----------------------------------------------------------------------
@contextmanager
def _kept_hydra_state() -> Iterator[None]:
    """Composing a run's config resets Hydra's globals; give the command's own back afterwards."""
    hydra_cfg = HydraConfig.instance().cfg
    global_hydra = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    try:
        yield
    finally:
        HydraConfig.instance().cfg = hydra_cfg
        GlobalHydra.instance().clear()
        if global_hydra is not None:
            GlobalHydra.instance().initialize(global_hydra)


@contextmanager
def _run_log(run_dir: Path) -> Iterator[None]:
    """The run's own ``train.log`` beside the comparison's (same format as Hydra's file handler)."""
    root = logging.getLogger()
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    template = next((h for h in root.handlers if isinstance(h, logging.FileHandler)), None)
    handler.setFormatter(template.formatter if template and template.formatter else
                         logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def _one_line(exc: BaseException) -> str:
    return " ".join((user_message(exc) or f"{type(exc).__name__}: {exc}").split())


def _save_hydra(run_cfg: DictConfig, overrides: list[str], run_dir: Path, root_dir: str) -> None:
    """``<run>/.hydra/``: config and overrides, so ``python -m ftlab <overrides>`` re-runs it and the
    after-training commands and ``ftlab report`` read it like any run."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    plain = copy.deepcopy(run_cfg)
    with open_dict(plain):
        plain.pop("hydra", None)
    OmegaConf.save(plain, hydra_dir / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), hydra_dir / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"cwd": root_dir}}}), hydra_dir / "hydra.yaml")


def run_one(overrides: list[str], run_dir: Path, root_dir: str) -> tuple[dict[str, Any] | None, str | None]:
    """Compose and run one configuration in ``run_dir``: (metrics, None), or (None, one-line error)."""
    from ftlab.crossval import run_folds
    from ftlab.train import run

    run_dir.mkdir(parents=True, exist_ok=True)
    with _kept_hydra_state(), _run_log(run_dir):
        try:
            run_cfg = compose_config(overrides, run_dir, root_dir=root_dir)
            _save_hydra(run_cfg, overrides, run_dir, root_dir)
            folds = run_cfg.data.get("folds") and run_cfg.data.get("fold") is None
            return (run_folds(run_cfg) if folds else run(run_cfg)), None
        except RunInterrupted:
            raise
        except Exception as exc:  # recorded; the comparison goes on
            message = _one_line(exc)
            if user_message(exc) is None:
                log.exception("compare_tuned: run in %s failed", run_dir)
            else:
                log.error("compare_tuned: run in %s failed: %s", run_dir, message)
            write_text(run_dir / ERROR_FILE, message + "\n")
            return None, message


def _score(metrics: dict[str, Any] | None, metric: str) -> float | None:
    value = (metrics or {}).get(metric)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


# -- the comparison ----------------------------------------------------------------------------------
def method_space(method: str, tune: dict[str, Any], base: list[str], seed: int, root_dir: str,
                 scratch: Path) -> dict[str, Any]:
    """The method's search space with its bounds resolved; composing its config here finds a wrong key
    before anything trains."""
    with _kept_hydra_state():
        try:
            probe = compose_config([*base, f"method={method}", f"seed={seed}"], scratch, root_dir=root_dir)
        except Exception as exc:
            raise UserError(f"tune.methods: method={method} does not compose with {' '.join(base) or 'the defaults'}: "
                            f"{_one_line(exc)}") from None
    return space_bounds(method, tune["space"][method], probe)


def tune_method(method: str, space: dict[str, Any], tune: dict[str, Any], base: list[str], seed: int, root: Path,
                root_dir: str) -> dict[str, Any]:
    """Search, then retrain the best with the seeds; the method's result (see :data:`CSV_COLUMNS`)."""
    import optuna

    method_dir = root / method
    result: dict[str, Any] = {"method": method, "path": str(method_dir), "trials": tune["trials"], "trials_ok": 0,
                              "trial_errors": [], "seed_errors": []}
    common = [*base, f"method={method}"]
    metric = tune["metric"]
    sampler = optuna.samplers.TPESampler(seed=tune["sampler_seed"], n_startup_trials=tune["startup_trials"])
    study = optuna.create_study(direction="maximize", sampler=sampler, study_name=method)
    tune_seconds = 0.0
    for i in range(tune["trials"]):
        trial = study.ask()
        values = suggest_values(trial, space)
        # test=false: a trial is chosen on validation alone and never even computes a test metric.
        overrides = [*common, f"seed={seed}", f"trainer.max_epochs={tune['epochs']}", "test=false",
                     *(f"{k}={_value(v)}" for k, v in values.items())]
        log.info("compare_tuned: %s trial %d/%d: %s", method, i + 1, tune["trials"],
                 " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
        metrics, error = run_one(overrides, method_dir / f"trial_{i}", root_dir)
        value = _score(metrics, metric)
        tune_seconds += float((metrics or {}).get("fit_seconds") or 0.0)
        if value is None:
            error = error or f"no finite {metric} in metrics.json"
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            result["trial_errors"].append(f"trial_{i}: {error}")
            log.warning("compare_tuned: %s trial %d failed: %s", method, i, error)
            continue
        study.tell(trial, value)
        result["trials_ok"] += 1
        log.info("compare_tuned: %s trial %d: %s %.4f", method, i, metric, value)
    result["tune_seconds"] = round(tune_seconds, 2)
    if result["trials_ok"] == 0:
        result["status"] = "failed"
        result["error"] = f"every trial failed ({result['trial_errors'][0]})" if result["trial_errors"] else "no trials"
        return result
    best = study.best_trial
    result["best_params"] = dict(best.params)
    result["best_val"] = best.value
    result["best_trial"] = best.number

    final: list[dict[str, Any]] = []
    seeds: list[int] = []
    for k in range(tune["seeds"]):
        run_seed = seed + 1 + k
        overrides = [*common, f"seed={run_seed}", f"trainer.max_epochs={tune['final_epochs']}",
                     *(f"{key}={_value(v)}" for key, v in best.params.items())]
        log.info("compare_tuned: %s best configuration, seed %d (%d/%d)", method, run_seed, k + 1, tune["seeds"])
        metrics, error = run_one(overrides, method_dir / f"seed_{run_seed}", root_dir)
        if metrics is None or _score(metrics, "test/acc") is None:
            result["seed_errors"].append(f"seed_{run_seed}: {error or 'no test/acc in metrics.json'}")
            continue
        final.append(metrics)
        seeds.append(run_seed)
    if not final:
        result["status"] = "failed"
        result["error"] = f"every seed run failed ({result['seed_errors'][0]})"
        return result
    result.update(aggregate(final, seeds=seeds))
    result["method"] = method  # the strategy's name in metrics.json may differ from the config's
    problems = result["trial_errors"] + result["seed_errors"]
    result["status"] = "partial" if problems else "ok"
    result["error"] = "; ".join(problems)
    return result


def run_comparison(cfg: DictConfig) -> dict[str, Any]:
    """Tune and retrain every method of ``cfg.tune``; write the summary; return ``comparison.json``'s content."""
    import optuna

    tune = check_tune(cfg)
    root = Path(cfg.paths.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    root_dir = str(cfg.paths.root_dir)
    base = base_overrides(cfg)
    seed = int(cfg.seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    log.info("compare_tuned: %s in %s: %d trials x %d epochs each, then %d seeds x %d epochs; overrides: %s",
             ", ".join(tune["methods"]), root, tune["trials"], tune["epochs"], tune["seeds"], tune["final_epochs"],
             " ".join(base) or "none")
    spaces = {m: method_space(m, tune, base, seed, root_dir, root) for m in tune["methods"]}
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    comparison = {"tune": tune, "overrides": base, "seed": seed, "results": results}
    for method in tune["methods"]:
        try:
            results.append(tune_method(method, spaces[method], tune, base, seed, root, root_dir))
        except RunInterrupted:
            comparison["wall_seconds"] = round(time.perf_counter() - started, 1)
            write_comparison(root, comparison, tune)
            raise UserError(f"compare_tuned was interrupted during {method}; the finished methods are in "
                            f"{root / 'summary.md'}") from None
        comparison["wall_seconds"] = round(time.perf_counter() - started, 1)
        write_comparison(root, comparison, tune, plot=False)
    text = write_comparison(root, comparison, tune)
    print("\n" + text, flush=True)
    print(f"summary: {root / 'summary.md'}, summary.csv, pareto.png, comparison.json", flush=True)
    return comparison


# -- the summary -------------------------------------------------------------------------------------
def _finished(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if _score(r, "test/acc") is not None]


def recommend(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Three plain lines from per-method rows (``method``, ``test/acc``, ``params_trainable_pct``,
    ``fit_seconds``): the most accurate, the best under 1 % trainable parameters, and the fastest within one
    point (0.01) of the best. "none" when nothing qualifies. Ties go to the earlier row."""
    done = _finished(rows)
    if not done:
        none = "none (no method finished)"
        return [f"Most accurate: {none}.", f"Best under 1 % trainable parameters: {none}.",
                f"Fastest within one point of the best: {none}."]

    def acc(r: dict[str, Any]) -> str:
        std, n = r.get("test/acc_std"), r.get("n")
        spread = f" ± {std:.4f}" if isinstance(std, (int, float)) else ""
        over = f" over {n} seeds" if isinstance(n, int) and n > 1 else ""
        return f"test acc {r['test/acc']:.4f}{spread}{over}"

    best = max(done, key=lambda r: r["test/acc"])  # max keeps the first of equals
    lines = [f"Most accurate: {best['method']} ({acc(best)})."]
    small = [r for r in done if isinstance(r.get("params_trainable_pct"), (int, float))
             and r["params_trainable_pct"] < LOW_PARAMS_PCT]
    if small:
        pick = max(small, key=lambda r: r["test/acc"])
        lines.append(f"Best under 1 % trainable parameters: {pick['method']} ({acc(pick)}, "
                     f"{pick['params_trainable_pct']:.3g} % trainable).")
    else:
        lines.append("Best under 1 % trainable parameters: none (every method trains 1 % of the parameters or more).")
    close = [r for r in done if r["test/acc"] >= best["test/acc"] - ONE_POINT - 1e-12
             and _score(r, "fit_seconds") is not None]
    if close:
        fast = min(close, key=lambda r: r["fit_seconds"])
        gap = best["test/acc"] - fast["test/acc"]
        behind = f", {gap:.4f} below {best['method']}" if fast is not best else ", the most accurate too"
        lines.append(f"Fastest within one point of the best: {fast['method']} "
                     f"(fit {fast['fit_seconds']:.1f} s, {acc(fast)}{behind}).")
    else:
        lines.append("Fastest within one point of the best: none (no fit times recorded).")
    return lines


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def _params(params: dict[str, Any] | None) -> str:
    if not params:
        return ""
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def markdown(rows: Sequence[dict[str, Any]], tune: dict[str, Any], title: str, wall: float | None) -> str:
    header = ["method", "best values (validation)", "best val", "trials ok", "n", "test/acc mean ± std",
              "test/acc 95 % CI", "trainable", "% trainable", "fit s", "peak RSS MB", "artifact", "status"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        mean, std = r.get("test/acc"), r.get("test/acc_std")
        acc = f"{mean:.4f} ± {std:.4f}" if _score(r, "test/acc") is not None and isinstance(std, (int, float)) \
            else _fmt(mean)
        low, high = r.get("test/acc_ci95_low"), r.get("test/acc_ci95_high")
        ci = f"{low:.4f} – {high:.4f}" if isinstance(low, float) and isinstance(high, float) else ""
        trainable = r.get("params_trainable")
        status = r.get("status", "")
        cells = [r["method"], _params(r.get("best_params")), _fmt(r.get("best_val")),
                 f"{r.get('trials_ok', 0)}/{r.get('trials', 0)}", str(r.get("n") or 0), acc, ci,
                 f"{trainable:,}" if isinstance(trainable, int) else "", _fmt(r.get("params_trainable_pct"), 2),
                 _fmt(r.get("fit_seconds"), 1), _fmt(r.get("peak_rss_mb"), 0), human_bytes(r.get("artifact_bytes")),
                 status]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "**Recommendation** (on the test accuracy mean over the seeds):", ""]
    lines += [f"- {line}" for line in recommend(rows)]
    notes = [
        f"Search: Optuna TPE, {tune['trials']} trials of {tune['epochs']} epoch(s) per method "
        f"({min(tune['startup_trials'], tune['trials'])} of them random), on {tune['metric']} (validation; the test split is not used to "
        f"choose). Then the best values retrained with {tune['seeds']} seed(s) for {tune['final_epochs']} epoch(s), "
        "tested once each.",
        "test/acc: mean ± sample standard deviation over the seeds; 95 % CI: Student's t, mean ± t(0.975, n−1)·std/√n "
        "(wide for few seeds: with 3, t = 4.30). Methods whose intervals overlap are not told apart by these seeds.",
        "fit s: mean training time of one seed run; peak RSS: the largest of the seed runs (each run's own peak).",
    ]
    if wall is not None:
        notes.append(f"Wall time so far: {wall / 60:.1f} min.")
    problems = [r for r in rows if r.get("error")]
    for r in problems:
        notes.append(f"{r['method']}: {r['error']}")
    lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def write_comparison(root: Path, comparison: dict[str, Any], tune: dict[str, Any], plot: bool = True) -> str:
    rows = comparison["results"]
    title = f"ftlab compare_tuned {root.name}"
    text = markdown(rows, tune, title, comparison.get("wall_seconds"))
    write_text(root / "summary.md", text)
    with atomic_open(root / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            out = {k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS}
            out["best_params"] = _params(r.get("best_params")) if r.get("best_params") else ""
            out["seeds"] = " ".join(str(s) for s in r.get("seeds") or [])
            writer.writerow(out)
    write_json(root / "comparison.json", comparison)
    if plot:
        try:
            plot_pareto(rows, root / "pareto.png", title)
        except Exception as exc:  # a plot must never turn a finished comparison into a failure
            log.warning("could not draw %s: %s: %s", root / "pareto.png", type(exc).__name__, exc)
    return text


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and accuracy (higher)."""
    front = []
    for i, (cost, acc) in enumerate(points):
        dominated = any((c <= cost and a >= acc) and (c < cost or a > acc) for c, a in points)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """``pareto.png``: test accuracy (mean, 95 % interval) against trainable parameters and against fit time,
    the Pareto front of each drawn as a line."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in _finished(rows) if _score(r, "params_trainable") and _score(r, "fit_seconds") is not None]
    fig = Figure(figsize=(13, 5.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    cmap = colormaps["tab10"]
    for ax, key, label, log_x in ((axes[0], "params_trainable", "trainable parameters (log scale)", True),
                                  (axes[1], "fit_seconds", "fit time per run (s)", False)):
        points = [(float(r[key]), float(r["test/acc"])) for r in done]
        for i, (r, (x, y)) in enumerate(zip(done, points, strict=True)):
            low, high = r.get("test/acc_ci95_low"), r.get("test/acc_ci95_high")
            yerr = [[y - low], [high - y]] if isinstance(low, float) and isinstance(high, float) else None
            ax.errorbar([x], [y], yerr=yerr, fmt="o", color=cmap(i % 10), ecolor="0.3", capsize=3, ms=8, zorder=3)
            ax.annotate(r["method"], (x, y), xytext=(6, 6), textcoords="offset points", fontsize=9)
        front = pareto_front(points)
        if len(front) > 1:
            ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="0.5", lw=1,
                    zorder=2, label="Pareto front")
            ax.legend(loc="lower right", fontsize=8)
        if log_x:
            ax.set_xscale("log")
        ax.margins(x=0.15, y=0.1)  # room for the labels
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean over seeds, 95 % interval)")
    axes[0].set_title("accuracy vs trainable parameters", fontsize=10)
    axes[1].set_title("accuracy vs fit time", fontsize=10)
    missing = len(rows) - len(done)
    fig.suptitle(title + (f" — {missing} method(s) without results not shown" if missing else ""), fontsize=11)
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
