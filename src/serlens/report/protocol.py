"""What the paper's protocol adds to its numbers: ``protocol_gap.tsv``.

The paper's published code (github.com/harryporry77/Behind-the-Scenes, ``train_lora.py``)
differs from an honest protocol in ways that can only raise its reported UAR and WAR. Each
deviation is measured here against the same method under the honest protocol, on the same
utterances:

* ``test_selection``: the checkpoint chosen on the *test* fold, by accuracy (WAR), over the
  epochs the run trained (the paper's ``Trainer``: ``eval_dataset=test_data``,
  ``metric_for_best_model="accuracy"``, ``load_best_model_at_end``). Every run records its
  test predictions after every epoch without using them (``test_epochs.tsv``,
  :class:`serlens.train.data.EpochPredictions`), so this costs no training.
  ``test_selection_uar`` picks the epoch of the best test UAR instead: the most any choice
  among the run's epochs can report, an upper bound of test-fold selection.
* the deviations that need their own runs (:data:`serlens.methods.DEVIATIONS`: dialog-prefix
  folds, 30-s padding, pooling over all 1500 frames), each a method with ``protocol:``; its
  row reads the run selected on dev as usual, and a second row (``+test_selection``) the
  same run with the paper's test-fold selection (``protocol: paper`` with it: every
  deviation together).

**Statistic.** Per (fold, seed) unit u of the honest method's folds, UAR_dev(u) − UAR_h(u),
averaged over units (:func:`serlens.stats.delta_uar`; prefix folds are regrouped by the
honest fold whose test utterances they are, so both systems are scored on the same units).
The 95 % interval is the paired, fold-stratified cluster bootstrap over speakers
(:func:`serlens.stats.cluster_bootstrap_delta`; utterances of one speaker move together).
ΔWAR uses the same bootstrap on correctness: with label 0 for every row and prediction
``0`` if correct else ``1``, the UAR of a unit is the recall of class 0, its accuracy.

The gap is reported whatever its sign: a deviation that costs accuracy here (a small
corpus, one seed) is a finding too, and its interval says how well it is measured.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from serlens import stats
from serlens.io import write_tsv_atomic
from serlens.methods import PAPER_PROTOCOL, Method, honest_counterpart
from serlens.train.data import label_indices

log = logging.getLogger(__name__)

#: The selection statistics of the read-off deviations: the paper's (accuracy) and the upper
#: bound (UAR).
SELECTIONS = {"test_selection": "war", "test_selection_uar": "uar"}
COLUMNS = [
    "model",
    "method",
    "deviation",
    "run_method",
    "applies",
    "uar_honest",
    "uar",
    "delta_uar",
    "delta_uar_low",
    "delta_uar_high",
    "war_honest",
    "war",
    "delta_war",
    "delta_war_low",
    "delta_war_high",
    "epoch_honest",
    "epoch",
    "n_folds",
    "n_seeds",
    "n_speakers",
    "n_utterances",
    "note",
]


def _unit_metric(labels: np.ndarray, preds: np.ndarray, metric: str, n_classes: int) -> float:
    if metric == "war":
        return float(np.mean(labels == preds))
    from serlens.metrics import uar

    return uar(labels, preds, n_classes)


def selected_on_test(test_epochs: pd.DataFrame, classes: list[str], metric: str = "war"):
    """``(epoch, rows)``: the epoch of a run's ``test_epochs.tsv`` with the best test-fold
    ``metric`` (``war`` = accuracy, the paper's; ``uar``) and its predictions; of tied epochs
    the earliest (the paper's Trainer replaces its best checkpoint only when strictly better).
    """
    n = len(classes)
    best_epoch, best_value = None, -np.inf
    for epoch, rows in test_epochs.groupby("epoch", sort=True):
        value = _unit_metric(
            label_indices(rows["label"], classes), label_indices(rows["pred"], classes), metric, n
        )
        if value > best_value + stats.TIE_TOL:
            best_epoch, best_value = int(epoch), value
    if best_epoch is None:
        raise ValueError("test_epochs.tsv holds no epoch")
    rows = test_epochs[test_epochs["epoch"] == best_epoch]
    return best_epoch, rows[["utt_id", "label", "pred"]].reset_index(drop=True)


def _delta(pooled: pd.DataFrame, classes, resamples: int, rng_seed: int, war: bool) -> dict:
    """Paired Δ (column ``pred`` minus ``pred_h``) with its speaker-cluster interval."""
    n = len(classes)
    labels = label_indices(pooled["label"], classes)
    a, b = label_indices(pooled["pred"], classes), label_indices(pooled["pred_h"], classes)
    if war:  # accuracy as the UAR of one class (module docstring)
        a, b = (a != labels).astype(np.int64), (b != labels).astype(np.int64)
        labels, n = np.zeros_like(labels), 2
    args = (labels, a, b, pooled["fold"].to_numpy(), pooled["seed"].to_numpy())
    if pooled["speaker"].nunique() < 2:
        return {"delta": stats.delta_uar(*args, n), "ci_low": np.nan, "ci_high": np.nan}
    return stats.cluster_bootstrap_delta(
        *args, pooled["speaker"].to_numpy(), n, resamples=resamples, rng_seed=rng_seed
    )


def _mean(pooled: pd.DataFrame, column: str, classes, metric: str) -> float:
    values = [
        _unit_metric(
            label_indices(unit["label"], classes),
            label_indices(unit[column], classes),
            metric,
            len(classes),
        )
        for _, unit in pooled.groupby(["fold", "seed"])
    ]
    return float(np.mean(values))


def gap_row(
    honest: pd.DataFrame,
    deviation: pd.DataFrame,
    classes: list[str],
    resamples: int = 2000,
    rng_seed: int = 0,
) -> dict:
    """One row's numbers: ``honest`` (utt_id, seed, fold, label, pred, speaker, epoch) and
    ``deviation`` (utt_id, seed, pred, epoch) paired on (seed, utt_id)."""
    pooled = honest.merge(
        deviation[["utt_id", "seed", "pred", "epoch"]],
        on=["utt_id", "seed"],
        suffixes=("_h", ""),
    )
    if pooled.empty:
        raise ValueError("the deviation and the honest runs share no (seed, utterance)")
    uar_d = _delta(pooled, classes, resamples, rng_seed, war=False)
    war_d = _delta(pooled, classes, resamples, rng_seed, war=True)
    return {
        "uar_honest": _mean(pooled, "pred_h", classes, "uar"),
        "uar": _mean(pooled, "pred", classes, "uar"),
        "delta_uar": uar_d["delta"],
        "delta_uar_low": uar_d["ci_low"],
        "delta_uar_high": uar_d["ci_high"],
        "war_honest": _mean(pooled, "pred_h", classes, "war"),
        "war": _mean(pooled, "pred", classes, "war"),
        "delta_war": war_d["delta"],
        "delta_war_low": war_d["ci_low"],
        "delta_war_high": war_d["ci_high"],
        "epoch_honest": float(pooled.drop_duplicates(["fold", "seed"])["epoch_h"].mean()),
        "epoch": float(pooled.drop_duplicates(["fold", "seed"])["epoch"].mean()),
        "n_folds": int(pooled["fold"].nunique()),
        "n_seeds": int(pooled["seed"].nunique()),
        "n_speakers": int(pooled["speaker"].nunique()),
        "n_utterances": int(pooled["utt_id"].nunique()),
        "note": (
            ""
            if len(pooled) == len(honest)
            else f"paired on {len(pooled)} of the honest runs' {len(honest)} predictions "
            "(runs missing from one side)"
        ),
    }


def _run_frames(runs, model, method, classes, selection: str | None):
    """Stacked predictions of one model and method: dev-selected (``selection`` None) or
    read off its test epochs by ``selection`` (a :data:`SELECTIONS` key)."""
    frames = []
    for (mo, me, seed, fold), (predictions, test_epochs, best_epoch) in sorted(runs.items()):
        if (mo, me) != (model, method):
            continue
        if selection is None:
            frame, epoch = predictions[["utt_id", "label", "pred"]], best_epoch
        else:
            epoch, frame = selected_on_test(test_epochs, classes, SELECTIONS[selection])
        frames.append(frame.assign(seed=int(seed), fold=int(fold), epoch=epoch))
    return pd.concat(frames, ignore_index=True) if frames else None


def protocol_gap_table(
    runs: Mapping[tuple, tuple[pd.DataFrame, pd.DataFrame, int]],
    manifest: pd.DataFrame,
    classes: list[str],
    methods: Mapping[str, Method],
    prefixes: bool = True,
    honest_folds: Mapping[int, int] | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Every deviation of every model and method (module docstring).

    ``runs``: ``{(model, method, seed, fold): (predictions, test_epochs, best_epoch)}``.
    ``prefixes``: the corpus has dialog prefixes (else the prefix deviation gets a row
    saying it does not apply). ``honest_folds``: prefix fold -> the honest fold whose test
    utterances it holds (default: fold f -> ceil(f / 2)).
    """
    speaker = manifest.set_index("utt_id")["speaker"].astype(str)
    honest_folds = honest_folds or {}
    rows = []
    models = sorted({key[0] for key in runs})
    for model in models:
        present = {key[1] for key in runs if key[0] == model}
        honest = [m for m in methods if m in present and methods[m].honest]
        for name in honest:
            base = _run_frames(runs, model, name, classes, None)
            base["speaker"] = speaker.loc[base["utt_id"]].to_numpy()
            for selection in SELECTIONS:
                deviation = _run_frames(runs, model, name, classes, selection)
                rows.append(
                    {
                        "model": model,
                        "method": name,
                        "deviation": selection,
                        "run_method": name,
                        "applies": True,
                        **gap_row(base, deviation, classes, resamples, seed),
                    }
                )
            for other in (m for m in methods.values() if not m.honest):
                if honest_counterpart(other, methods).name != name:
                    continue
                label = "+".join(other.protocol)
                if other.prefix_folds and not prefixes:
                    rows.append(
                        {
                            "model": model,
                            "method": name,
                            "deviation": label,
                            "run_method": other.name,
                            "applies": False,
                            "note": "the corpus has no dialog prefixes (IEMOCAP's SesNNF_/SesNNM_), "
                            "so the paper's prefix folds do not apply",
                        }
                    )
                    continue
                for selection in (None, "test_selection"):
                    deviation = _run_frames(runs, model, other.name, classes, selection)
                    if deviation is None:
                        raise ValueError(f"{model}/{other.name}: no runs to compare")
                    if other.prefix_folds:  # regrouped by the honest fold (docstring)
                        deviation["fold"] = [
                            honest_folds.get(int(f), (int(f) + 1) // 2) for f in deviation["fold"]
                        ]
                    if selection is None:
                        what = label
                    elif other.protocol == PAPER_PROTOCOL:
                        what = "paper (all together)"
                    else:
                        what = f"{label}+test_selection"
                    rows.append(
                        {
                            "model": model,
                            "method": name,
                            "deviation": what,
                            "run_method": other.name,
                            "applies": True,
                            **gap_row(base, deviation, classes, resamples, seed),
                        }
                    )
    return pd.DataFrame(rows, columns=COLUMNS)


def read_runs(files: Mapping[tuple, Path]) -> dict:
    """``{key: (predictions, test_epochs, best_epoch)}`` from ``{key: run folder}``."""
    import json

    out = {}
    for key, run in files.items():
        run = Path(run)
        out[key] = (
            pd.read_csv(run / "predictions.tsv", sep="\t", dtype={"utt_id": str}),
            pd.read_csv(run / "test_epochs.tsv", sep="\t", dtype={"utt_id": str}),
            int(json.loads((run / "metrics.json").read_text())["best_epoch"]),
        )
    return out


def write_protocol_gap(
    files: Mapping[tuple, Path],
    manifest_path: Path,
    classes: list[str],
    methods: Mapping[str, Method],
    out: Path,
    prefixes: bool = True,
    resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    from serlens.corpus.manifest import read_manifest

    table = protocol_gap_table(
        read_runs(files),
        read_manifest(manifest_path),
        classes,
        methods,
        prefixes=prefixes,
        resamples=resamples,
        seed=seed,
    )
    write_tsv_atomic(table, out)
    return table
