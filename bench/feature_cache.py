"""Frozen-backbone feature cache: wall time of the epochs after the first, ``data.cache_features=false``
vs ``auto`` (on), and the test accuracy of both.

The shipped config (digits, EfficientNet-Lite0 at 64 px, batch 32, ``data.num_workers=auto``) with
``method=linear`` and 4 epochs (``--epochs``), built and trained as ``python -m ftlab`` does (``ftlab.train.build``:
progress bar, TensorBoard, checkpoints), then tested on the best checkpoint. An epoch is timed from
``on_train_epoch_start`` to ``on_train_epoch_end``: its training batches, its validation and the
checkpoints written after it. The cached run computes its features before the first epoch (train in
``configure_optimizers``, val at the sanity check); that one-off cost is reported apart. The two settings
alternate (false, auto, false, auto; ``--rounds``) so that load from other processes falls on both alike.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import TINY_OVERRIDES, compose, parse_args, row, tiny_image_folder, write_result


def _epoch_timer() -> Any:
    import lightning as L

    class EpochTimer(L.Callback):
        """Seconds per training epoch, its validation and checkpoints included."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._t0 = 0.0

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            self._t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            self.seconds.append(time.perf_counter() - self._t0)

    return EpochTimer()


def _train_and_test(cfg: Any) -> dict[str, Any]:
    from ftlab.train import build

    timer = _epoch_timer()
    datamodule, model, trainer = build(cfg, [timer])
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, weights_only=True)
    fit_s = time.perf_counter() - started
    results = trainer.test(model, datamodule=datamodule, ckpt_path="best", verbose=False, weights_only=True)
    return {"epochs_s": timer.seconds, "fit_s": fit_s, "test_acc": float(results[0]["test/acc"]),
            "cached": datamodule.feature_cache is not None,
            "before_first_epoch_s": fit_s - sum(timer.seconds)}


def _options(parser: Any) -> None:
    parser.add_argument("--rounds", type=int, default=2, help="runs of each setting, alternating")
    parser.add_argument("--epochs", type=int, default=4, help="trainer.max_epochs of every run (>= 2)")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _options)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="ftlab-bench-"))
    if args.tiny:
        base = [*TINY_OVERRIDES, "data=imagefolder", f"data.root={tiny_image_folder(tmp / 'images')}", "data.augment=none",
                "data.num_workers=0", "data.batch_size=8", "trainer.max_epochs=2"]
        rounds = 1
    else:
        base, rounds = [f"trainer.max_epochs={max(2, args.epochs)}"], args.rounds
    base = ["method=linear", *base]
    runs: dict[str, list[dict[str, Any]]] = {"false": [], "auto": []}
    for i in range(rounds):
        for mode in runs:
            cfg = compose([*base, f"data.cache_features={mode}"], tmp / f"{mode}_{i}")
            runs[mode].append(_train_and_test(cfg))
            r = runs[mode][-1]
            print(f"[feature_cache] data.cache_features={mode}: epochs {[round(s, 3) for s in r['epochs_s']]} s, "
                  f"fit {r['fit_s']:.1f} s, test/acc {r['test_acc']:.4f}", flush=True)
    if not all(r["cached"] for r in runs["auto"]) or any(r["cached"] for r in runs["false"]):
        raise SystemExit("data.cache_features did not switch as asked")

    later = {m: [s for r in rs for s in r["epochs_s"][1:]] for m, rs in runs.items()}
    first = {m: statistics.median(r["epochs_s"][0] for r in rs) for m, rs in runs.items()}
    setup = {m: statistics.median(r["before_first_epoch_s"] for r in rs) for m, rs in runs.items()}
    median = {m: statistics.median(v) for m, v in later.items()}
    acc = {m: rs[0]["test_acc"] for m, rs in runs.items()}
    epochs = len(runs["false"][0]["epochs_s"])
    rows = [
        row("feature cache: later-epoch speed-up", median["false"] / median["auto"], "≥ 20",
            f"median wall seconds of epochs 2..{epochs} (training + validation + checkpoints), {rounds} run(s) "
            f"each: {median['false']:.3f} s uncached vs {median['auto']:.4f} s cached; first epoch "
            f"{first['false']:.2f} s vs {first['auto']:.3f} s; before the first epoch (incl. the cache's one "
            f"feature pass over train+val) {setup['false']:.2f} s vs {setup['auto']:.2f} s", args.tiny),
        row("feature cache: test acc difference", abs(acc["false"] - acc["auto"]), "≤ 0.01",
            f"test/acc (best checkpoint) {acc['false']:.4f} uncached vs {acc['auto']:.4f} cached", args.tiny),
    ]
    config = {"overrides": base, "rounds": rounds, "epochs": epochs,
              "epoch_seconds": {m: [[round(s, 4) for s in r["epochs_s"]] for r in rs] for m, rs in runs.items()},
              "fit_seconds": {m: [round(r["fit_s"], 2) for r in rs] for m, rs in runs.items()},
              "test_acc": {m: [r["test_acc"] for r in rs] for m, rs in runs.items()}}
    write_result("feature_cache", args.out, rows, config, started)


if __name__ == "__main__":
    main()
