"""Layer-wise linear probes of emotion, with a control task that measures what a probe memorises.

For each of the encoder's L + 1 hidden states (transformers' convention: the conv + position
embedding, the outputs of layers 1..L-1, and the final-LayerNorm output of layer L), every
utterance is reduced to the masked mean over its audio frames, and a linear probe is fitted
and scored under one or two protocols (below).

The probe
---------
Standardised features (``StandardScaler`` fitted on the fitting rows only) and an
L2-regularised multinomial logistic regression (scikit-learn, lbfgs, ``class_weight =
"balanced"``, so every class weighs the same in the loss whatever its frequency)::

    min_{W, b}  ½‖W‖²_F + C Σ_i w_{y_i} · (−log softmax(W x_i + b)_{y_i}),   w_k = N / (K N_k)

The inverse strength ``C`` is chosen from ``analysis.probe_Cs`` by cross-validation on the
fitting rows, maximising the mean validation UAR; ties go to the smallest C (the strongest
regularisation). The CV is *grouped by session* (``GroupKFold`` with
``analysis.probe_cv_folds`` splits, :func:`cv_folds`): the session is the unit the
workflow's folds hold out (IEMOCAP's sessions, EmoDB's speaker pairs), so no session — and
so no speaker — is in both the fitting and the validation part, and the choice of C does not
reward memorising sessions or speakers. Where the rows hold fewer sessions than CV splits,
the groups are the speakers (a corpus with one session per speaker is the same thing); where
they hold fewer speakers too (a cross-fit half, usually one speaker), the CV is over
utterances, stratified by label (within one speaker the speaker is constant, so it cannot be
memorised across the parts; the column ``cv_groups`` says which grouping was used). The
scaler is refitted inside every CV split. The probe is then refitted on all fitting rows with
the chosen C and scored: UAR (:func:`serlens.metrics.uar`) and WAR (accuracy).

Protocols (column ``protocol``)
-------------------------------
``train_test`` (frozen runs only): fitted on the fold's train split, scored on its test
split (held-out speakers). For a LoRA run this is not honest: the adapter was trained on the
train split, so its states there are fitted, not representative; it is not run.

``crossfit_test`` (every run, so frozen and LoRA are compared under the same protocol): only
the fold's test split, which no adapter saw. Its speakers are split into two halves (sorted,
alternating: IEMOCAP's, the synthetic corpus' and EmoDB's test folds hold two speakers, one per
half); a probe is fitted on one half's utterances (its C chosen by CV inside that half) and
scores the other half, and the halves swap; the predictions are pooled, so every test
utterance is scored once, always by a probe fitted on other speakers. ``C`` is the geometric
mean of the two halves' choices, ``cv_uar`` the mean of their CV scores. With a single test
speaker the cross-fit is impossible: its rows are NaN with the reason in ``status``.

The control task (Hewitt & Liang 2019, "Designing and interpreting probes with control
tasks", EMNLP)
--------------------------------------------------------------------------------------------
A control task has the output space of the real one, but its labels are a fixed random
function of something the probe can memorise and that recurs at test time: Hewitt & Liang
give every *word type* a random label. Here the recurring unit is the utterance's *item*, the
sentence it says where the corpus has one that several speakers say (the manifest's ``item``
column: EmoDB's ten texts, IEMOCAP's and the synthetic corpus' script lines; improvised
utterances have none; :mod:`serlens.corpus.manifest`). :func:`control_labels` gives every
distinct item of the corpus one label in 0..K−1, seeded by ``analysis_seed``, the same in
every fold and run, with the class distribution matched to the emotion labels of the
utterances with items as far as item sizes allow. The control probe has the emotion probe's
C at the same layer and protocol (Hewitt & Liang compare the two tasks at one probe
configuration) and sees only rows with an item: it is fitted on the fitting rows' items and
scored on the scored rows whose item also occurs among the fitting rows (the others carry a
label it never saw). A probe that can recognise the sentence scores high on the control
task; one that reads only emotion stays near chance (UAR 1/K), since the items' labels are
independent of emotion.

Selectivity = task − control (Hewitt & Liang 2019, §3), for UAR and WAR, per layer and
protocol: high where the layer makes emotion linearly readable beyond what the probe can
memorise about the sentence. Where the corpus has no recurring items (a user manifest
without ``item``), or the fold's scored rows share no item with its fitting rows, the control
rows are NaN with the reason in ``status`` (e.g. ``no recurring item in this corpus``), and so
is the selectivity — not a number that would only be task − chance.

The speaker band
----------------
UAR is not additive over speakers: the pooled UAR averages per-class recalls whose
denominators pool the classes' utterances over speakers, so a mean of per-speaker UARs is
another statistic (and undefined for a speaker lacking a class). The band is therefore a
*speaker-cluster bootstrap of the reported statistic* (:func:`speaker_bootstrap`): the
probes stay as fitted, and each resample recomputes UAR and WAR from the test predictions of
the utterances of resampled test speakers, pooled (so it is the variation over the speakers
scored, not over those fitted on: the probes are not refitted). With the scored utterances
i, their labels y_i, predictions ŷ_i and speakers s(i) ∈ {1..S} (sorted), the per-speaker counts
``n_sk = #{i: s(i) = s, y_i = k}`` and ``c_sk = #{i: s(i) = s, y_i = k = ŷ_i}``, resample b
draws S − 1 speakers with replacement, speaker s m_bs times (a speaker drawn twice counts
twice), and::

    UAR_b = (1 / |K_b|) Σ_{k ∈ K_b} (Σ_s m_bs c_sk) / (Σ_s m_bs n_sk),   K_b = {k : Σ_s m_bs n_sk > 0}
    WAR_b = (Σ_{s,k} m_bs c_sk) / (Σ_{s,k} m_bs n_sk)
    band  = [q_2.5 %, q_97.5 %] of {UAR_b : b = 1..B},   B = BAND_RESAMPLES = 1000

— as :func:`serlens.stats.cluster_bootstrap_uar` on one fold, to which it is identical for
the same seed. S − 1 draws rather than S: the rescaled bootstrap of :mod:`serlens.stats`
(McCarthy & Snowden 1985), whose S draws understate the variance by (S − 1)/S. The draws are
seeded by ``analysis_seed`` and are the same for every layer, task and protocol (the same
test speakers), so the emotion and the control task of a layer are resampled *paired*: the
selectivity band is the percentile band of UAR_b(emotion) − UAR_b(control). Resamples whose
speakers have no scored utterance (the control task scores only the utterances with a
recurring item) have no value and are left out of the percentiles. With two test speakers
(IEMOCAP's, EmoDB's and the synthetic corpus' folds) every resample is one speaker, and the
band runs from the probe's UAR on one speaker's utterances alone to that on the other's: not a
calibrated 95 % interval (two clusters cannot give one), but how far the fold's number moves
with who was recorded. A fold with one test speaker, or a task whose scored utterances come
from one, has no band (NaN, the reason in ``status``). The band describes *one fold's* UAR;
the aggregated table averages the per-fold limits over folds and seeds (its ``mean`` of the
band rows), which is the band of a typical fold, wider than an interval of the mean over
independent folds would be. The aggregate's own speaker band
(:func:`serlens.report.aggregate.speaker_band`) needs per-speaker rows whose
utterance-weighted mean is the run's value, which UAR's are not.

Output (tidy, one row per protocol × layer × task)
-------------------------------------------------
``protocol``, ``layer`` (0..L), ``depth`` (= layer / L), ``task`` (``emotion`` or
``control``), ``status`` (``ok`` or why the row is empty), ``C`` (the chosen inverse
strength), ``cv_uar`` (mean CV UAR at that C; empty on control rows, which take the emotion
probe's C), ``cv_groups`` (``session``, ``speaker`` or ``utterance``), ``uar``, ``war``,
``converged`` (every final fit converged), ``cv_unconverged`` (number of CV fits that stopped
without converging; lbfgs warnings are recorded here, not dropped), ``n_train`` (rows the
probe(s) were fitted on), ``n_test`` (rows scored; 0 where nothing was), and
``selectivity_uar``, ``selectivity_war`` (emotion − control of the same protocol and layer)
on the ``emotion`` rows, empty (NaN) on the ``control`` rows.

With ``band_resamples > 0`` (the workflow's :func:`_compute`; :func:`probe_layers` and
:func:`compute_probing` leave it off by default) every row is followed, after all of them,
by two *band rows* with the same ``protocol, layer, depth`` and ``task`` =
``{task}_band_low`` and ``{task}_band_high``: their ``uar``, ``war`` (and, on the emotion
band rows, ``selectivity_uar``, ``selectivity_war``) are the lower and upper limits of the
speaker band (above); ``status`` is ``ok`` or why there is no band; ``C`` and ``cv_uar`` are
empty (the band rows describe the probe of their row, whose ``n_train``, ``n_test``,
``cv_groups``, ``converged`` they repeat). Band rows, not band columns, so the fold
aggregation (:mod:`serlens.report.aggregate`, which melts the spec's value columns) averages
the limits like any value, and per-run tables without them still aggregate.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, KFold, StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from serlens.analysis.runs import TrainedRun
from serlens.corpus.manifest import speakers_from_manifest
from serlens.errors import ConfigError, CorpusError
from serlens.metrics import uar, war
from serlens.models.encoder import pooled_layer_states
from serlens.train.data import Split

__all__ = [
    "PROTOCOLS",
    "Probe",
    "ProbeSet",
    "compute_probing",
    "control_labels",
    "control_targets",
    "crossfit_directions",
    "cv_folds",
    "fit_probe",
    "pooled_states",
    "probe_layers",
    "speaker_bootstrap",
    "speaker_draws",
    "speakers_from_manifest",
]

MAX_ITER = 500
PROTOCOLS = ("train_test", "crossfit_test")
TASKS = ("emotion", "control")
OK = "ok"
NO_ITEM = "no recurring item in this corpus"
ONE_SPEAKER = "cross-fit needs two test speakers; this fold has one"
NO_TRAIN_TEST_ITEM = "no test utterance's item occurs in the train split"
NO_CROSSFIT_ITEM = "no item recurs between the two halves of the test speakers"
#: The speaker band (module docstring): resamples, level, and the ``task`` suffixes of its rows.
BAND_RESAMPLES = 1000
BAND_LEVEL = 0.95
BAND_BOUNDS = ("band_low", "band_high")
ONE_BAND_SPEAKER = "the speaker band needs two test speakers; this fold has one"
ONE_SCORED_SPEAKER = "the speaker band needs two speakers among the scored utterances"


# --------------------------------------------------------------------------- control labels


def control_labels(
    items: Sequence[str], labels: Sequence[int], n_classes: int, seed: int
) -> dict[str, int]:
    """item -> control label in 0..K−1: a fixed random function of the item (Hewitt & Liang 2019).

    ``items`` and ``labels`` are per utterance (``""`` = no item; those rows are ignored). The
    class distribution follows the emotion labels of the utterances with an item as far as
    item sizes allow: items are visited most frequent first (ties in a seeded random order)
    and each goes to the class furthest below its share of utterances (ties broken at
    random). The result depends on the set of (item, label) rows and ``seed`` only, not on
    their order, so the train and test rows of any fold see the same label for an item.
    """
    items = np.asarray(items, dtype=str)
    labels = np.asarray(labels, dtype=np.int64)
    if items.shape != labels.shape:
        raise ValueError(f"items {items.shape} and labels {labels.shape} differ in shape")
    has = items != ""
    if not has.any():
        return {}
    names, counts = np.unique(items[has], return_counts=True)  # sorted: order-independent
    target = np.bincount(labels[has], minlength=n_classes)[:n_classes].astype(np.float64)
    rng = np.random.default_rng([int(seed), 0x5EC7])
    order = rng.permutation(len(names))
    order = order[np.argsort(-counts[order], kind="stable")]
    assigned = np.zeros(n_classes)
    out = {}
    for i in order:
        deficit = target - assigned
        best = np.flatnonzero(deficit == deficit.max())
        k = int(best[rng.integers(len(best))])
        out[str(names[i])] = k
        assigned[k] += counts[i]
    return out


def control_targets(items: Sequence[str], mapping: Mapping[str, int]) -> np.ndarray:
    """Per-utterance control labels, −1 where the utterance has no item (or one ``mapping`` lacks)."""
    return np.array([mapping.get(str(i), -1) if i else -1 for i in items], dtype=np.int64)


# --------------------------------------------------------------------------- fitting


def cv_folds(
    sessions: np.ndarray,
    speakers: np.ndarray,
    labels: np.ndarray,
    n_splits: int,
    seed: int,
    allow_utterances: bool = False,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """(fit, validation) index pairs of the CV that chooses C, and the grouping used.

    ``GroupKFold`` over sessions (every session falls in exactly one validation part), else
    over speakers where there are fewer sessions than ``n_splits``; else, with
    ``allow_utterances`` (a cross-fit half), a label-stratified K-fold over utterances
    (seeded), and a ConfigError otherwise.
    """
    labels = np.asarray(labels)
    X = np.zeros((len(labels), 1))
    for name, groups in (("session", sessions), ("speaker", speakers)):
        groups = np.asarray(groups)
        if len(np.unique(groups)) >= n_splits:
            return list(GroupKFold(n_splits=n_splits).split(X, groups=groups)), name
    if not allow_utterances:
        raise ConfigError(
            f"analysis.probe_cv_folds = {n_splits} but the train split has only "
            f"{len(np.unique(sessions))} sessions and {len(np.unique(speakers))} speakers; "
            f"set analysis.probe_cv_folds to at most {len(np.unique(speakers))}."
        )
    if len(labels) < 2:
        return [], "utterance"
    counts = np.unique(labels, return_counts=True)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only ..."
        if counts.max() >= n_splits:
            splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            return list(splitter.split(X, labels)), "utterance"
    splitter = KFold(n_splits=min(n_splits, len(labels)), shuffle=True, random_state=seed)
    return list(splitter.split(X)), "utterance"


def _fit_logged(model, X: np.ndarray, y: np.ndarray) -> bool:
    """Fit ``model``; True when it converged. ConvergenceWarnings are returned as False, others pass on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X, y)
    converged = True
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            converged = False
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return converged


def _logistic(C: float, max_iter: int, warm_start: bool = False) -> LogisticRegression:
    # The default penalty is pure L2 (l1_ratio = 0); lbfgs fits the multinomial (softmax) model.
    return LogisticRegression(
        C=C, class_weight="balanced", solver="lbfgs", max_iter=max_iter, warm_start=warm_start
    )


@dataclass
class Probe:
    """A fitted probe: scaler + logistic regression, the chosen C and how it was chosen."""

    model: Pipeline
    C: float
    cv_uar: float
    converged: bool
    cv_unconverged: int

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.model.predict(np.asarray(X, dtype=np.float64))


def fit_probe(
    X: np.ndarray,
    y: np.ndarray,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    Cs: Sequence[float],
    n_classes: int,
    max_iter: int = MAX_ITER,
    C: float | None = None,
) -> Probe:
    """Standardise + L2 multinomial logistic regression; C chosen by CV over ``splits`` (mean
    UAR, ties to the smallest C), or fixed to ``C`` (no CV, ``cv_uar`` NaN).

    Within each CV split the Cs are fitted from the strongest regularisation up, each fit
    warm-started from the previous solution, so the path costs little more than one fit. A
    split whose fitting part holds a single class is skipped; with no usable split the
    smallest C is taken.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    cv_uar, cv_unconverged = np.nan, 0
    if C is None:
        Cs = sorted(float(c) for c in Cs)
        scores = np.full((len(splits), len(Cs)), np.nan)
        for f, (fit_idx, val_idx) in enumerate(splits):
            if len(np.unique(y[fit_idx])) < 2:
                continue
            scaler = StandardScaler().fit(X[fit_idx])
            X_fit, X_val = scaler.transform(X[fit_idx]), scaler.transform(X[val_idx])
            clf = _logistic(Cs[0], max_iter, warm_start=True)
            for j, c in enumerate(Cs):
                cv_unconverged += not _fit_logged(clf.set_params(C=c), X_fit, y[fit_idx])
                scores[f, j] = uar(y[val_idx], clf.predict(X_val), n_classes)
        usable = ~np.isnan(scores).all(axis=1)
        best = 0
        if usable.any():
            mean = scores[usable].mean(axis=0)
            best = int(np.argmax(mean))  # first maximum = smallest C among ties
            cv_uar = float(mean[best])
        C = Cs[best]
    model = make_pipeline(StandardScaler(), _logistic(float(C), max_iter))
    converged = _fit_logged(model, X, y)
    return Probe(
        model=model, C=float(C), cv_uar=cv_uar, converged=converged, cv_unconverged=cv_unconverged
    )


# --------------------------------------------------------------------------- the speaker band


def speaker_draws(n_speakers: int, resamples: int, seed: int) -> np.ndarray:
    """``(resamples, n_speakers)`` multiplicities m_bs: each resample draws n_speakers − 1
    speakers with replacement (module docstring; the draws of :mod:`serlens.stats` for one
    fold, from ``np.random.default_rng(seed)``)."""
    if n_speakers < 2:
        raise ValueError(f"the speaker band needs at least 2 speakers, got {n_speakers}")
    if int(resamples) < 2:
        raise ValueError(f"resamples: must be at least 2, got {resamples}")
    resamples = int(resamples)
    rng = np.random.default_rng(int(seed))
    drawn = rng.integers(0, n_speakers, size=(resamples, n_speakers - 1))
    flat = (drawn + n_speakers * np.arange(resamples)[:, None]).ravel()
    counts = np.bincount(flat, minlength=resamples * n_speakers)
    return counts.reshape(resamples, n_speakers).astype(np.float64)


def resampled_scores(
    labels: np.ndarray,
    preds: np.ndarray,
    speaker: np.ndarray,
    weights: np.ndarray,
    n_classes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """UAR_b and WAR_b (module docstring) of every resample, ``(resamples,)`` each.

    ``speaker``: per utterance, its column in ``weights`` (``(resamples, S)`` multiplicities).
    NaN where a resample holds no utterance.
    """
    labels = np.asarray(labels, dtype=np.int64)
    speaker = np.asarray(speaker, dtype=np.int64)
    correct = (np.asarray(preds) == labels).astype(np.float64)
    n_speakers = weights.shape[1]
    support = np.zeros((n_speakers, n_classes))
    hits = np.zeros((n_speakers, n_classes))
    np.add.at(support, (speaker, labels), 1.0)
    np.add.at(hits, (speaker, labels), correct)
    n, c = weights @ support, weights @ hits  # (resamples, K): pooled counts per class
    present = n > 0
    recall = np.divide(c, n, out=np.zeros_like(c), where=present)
    n_present, total = present.sum(axis=1), n.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        uar_b = np.where(n_present > 0, recall.sum(axis=1) / n_present, np.nan)
        war_b = np.where(total > 0, c.sum(axis=1) / total, np.nan)
    return uar_b, war_b


def percentile_band(draws: np.ndarray, level: float = BAND_LEVEL) -> tuple[float, float]:
    """The ``(1 − level)/2`` and ``(1 + level)/2`` quantiles of the finite draws (NaN, NaN if none)."""
    if not 0 < level < 1:
        raise ValueError(f"level: must lie in (0, 1), got {level}")
    finite = np.asarray(draws, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        return np.nan, np.nan
    low, high = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def speaker_bootstrap(
    labels,
    preds,
    speakers,
    n_classes: int,
    resamples: int = BAND_RESAMPLES,
    seed: int = 0,
    level: float = BAND_LEVEL,
) -> dict[str, tuple[float, float]]:
    """The speaker band (module docstring) of one set of predictions: ``{"uar": (low, high),
    "war": (low, high)}``; ``speakers`` per utterance (at least two distinct)."""
    names, speaker = np.unique(np.asarray(speakers, dtype=str), return_inverse=True)
    weights = speaker_draws(len(names), resamples, seed)
    uar_b, war_b = resampled_scores(labels, preds, speaker, weights, n_classes)
    return {"uar": percentile_band(uar_b, level), "war": percentile_band(war_b, level)}


def _band_rows(
    table: pd.DataFrame,
    scored: Mapping[tuple[str, int, str], tuple[np.ndarray, np.ndarray, np.ndarray]],
    speakers: np.ndarray,
    n_classes: int,
    resamples: int,
    seed: int,
    level: float = BAND_LEVEL,
) -> pd.DataFrame:
    """Two band rows per row of ``table`` (module docstring). ``scored``: (protocol, layer,
    task) -> (scored test rows, their labels, their predictions)."""
    names, speaker = np.unique(np.asarray(speakers, dtype=str), return_inverse=True)
    weights = speaker_draws(len(names), resamples, seed) if len(names) >= 2 else None
    draws, status = {}, {}
    for protocol, layer, task, row_status in table[
        ["protocol", "layer", "task", "status"]
    ].itertuples(index=False):
        key = (protocol, int(layer), task)
        if row_status != OK:
            status[key] = row_status
        elif weights is None:
            status[key] = ONE_BAND_SPEAKER
        elif len(np.unique(speaker[scored[key][0]])) < 2:
            status[key] = ONE_SCORED_SPEAKER
        else:
            index, y, pred = scored[key]
            draws[key] = resampled_scores(y, pred, speaker[index], weights, n_classes)
            status[key] = OK
    out = []
    for est in table.to_dict("records"):
        key = (est["protocol"], int(est["layer"]), est["task"])
        got = draws.get(key)
        other = draws.get((key[0], key[1], "control")) if key[2] == "emotion" else None
        limits = {}
        for metric, i in (("uar", 0), ("war", 1)):
            limits[metric] = percentile_band(got[i], level) if got else (np.nan, np.nan)
            paired = got is not None and other is not None
            limits[f"selectivity_{metric}"] = (
                percentile_band(got[i] - other[i], level) if paired else (np.nan, np.nan)
            )
        for b, bound in enumerate(BAND_BOUNDS):
            row = {
                **est,
                "task": f"{est['task']}_{bound}",
                "status": status[key],
                "C": np.nan,
                "cv_uar": np.nan,
            }
            row.update({metric: pair[b] for metric, pair in limits.items()})
            out.append(row)
    return pd.DataFrame(out, columns=table.columns)


# --------------------------------------------------------------------------- the table


@dataclass
class ProbeSet:
    """One split's probing inputs, row-aligned: (N, L + 1, D) pooled states, emotion label
    indices, speakers, sessions and items (``""`` = none)."""

    states: np.ndarray
    labels: np.ndarray
    speakers: np.ndarray
    sessions: np.ndarray
    items: np.ndarray

    def __post_init__(self):
        self.states = np.asarray(self.states)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.speakers = np.asarray(self.speakers, dtype=str)
        self.sessions = np.asarray(self.sessions, dtype=str)
        self.items = np.asarray(self.items, dtype=str)
        n = len(self.states)
        for name in ("labels", "speakers", "sessions", "items"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} rows, states {n}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_layers(self) -> int:
        return self.states.shape[1] - 1


def crossfit_directions(speakers: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The cross-fit's (fit, score) index pairs: sorted speakers split alternately into two
    halves, fit on one and score the other, then swap. None with fewer than two speakers."""
    speakers = np.asarray(speakers, dtype=str)
    names = sorted(set(speakers))
    if len(names) < 2:
        return None
    first = np.isin(speakers, names[0::2])
    a, b = np.flatnonzero(first), np.flatnonzero(~first)
    return [(a, b), (b, a)]


def _row(protocol, layer, n_layers, task, status, **values) -> dict:
    row = {
        "protocol": protocol,
        "layer": layer,
        "depth": layer / n_layers if n_layers else 0.0,
        "task": task,
        "status": status,
        "C": np.nan,
        "cv_uar": np.nan,
        "cv_groups": "",
        "uar": np.nan,
        "war": np.nan,
        "converged": np.nan,
        "cv_unconverged": 0,
        "n_train": 0,
        "n_test": 0,
    }
    row.update(values)
    return row


def _control_plan(fit_items, fit_ctrl, score_items, score_ctrl, has_items: bool, no_recurrence):
    """(fit rows, scored rows, status) of a control probe, as indices into the given arrays."""
    if not has_items:
        return None, None, NO_ITEM
    fit_rows = np.flatnonzero(fit_ctrl >= 0)
    score_rows = np.flatnonzero((score_ctrl >= 0) & np.isin(score_items, fit_items[fit_rows]))
    if not len(score_rows):
        return None, None, no_recurrence
    if len(np.unique(fit_ctrl[fit_rows])) < 2:
        return None, None, "the fitting utterances' items have a single control label"
    return fit_rows, score_rows, OK


def _train_test(train: ProbeSet, test: ProbeSet, control, n_classes, Cs, cv, seed, max_iter):
    splits, groups = cv_folds(train.sessions, train.speakers, train.labels, cv, seed)
    ctrl_train, ctrl_test = (
        control_targets(train.items, control),
        control_targets(test.items, control),
    )
    fit_rows, score_rows, status = _control_plan(
        train.items, ctrl_train, test.items, ctrl_test, bool(control), NO_TRAIN_TEST_ITEM
    )
    rows, scored = [], {}
    everyone = np.arange(len(test))
    for layer in range(train.n_layers + 1):
        X_train, X_test = train.states[:, layer], test.states[:, layer]
        probe = fit_probe(X_train, train.labels, splits, Cs, n_classes, max_iter)
        pred = probe.predict(X_test)
        scored["train_test", layer, "emotion"] = (everyone, test.labels, pred)
        common = dict(C=probe.C, cv_groups=groups)
        rows.append(
            _row(
                "train_test", layer, train.n_layers, "emotion", OK,
                cv_uar=probe.cv_uar, uar=uar(test.labels, pred, n_classes),
                war=war(test.labels, pred), converged=probe.converged,
                cv_unconverged=probe.cv_unconverged, n_train=len(train), n_test=len(test),
                **common,
            )
        )  # fmt: skip
        if status != OK:
            rows.append(_row("train_test", layer, train.n_layers, "control", status))
            continue
        ctrl = fit_probe(
            X_train[fit_rows], ctrl_train[fit_rows], (), Cs, n_classes, max_iter, C=probe.C
        )
        y, pred = ctrl_test[score_rows], ctrl.predict(X_test[score_rows])
        scored["train_test", layer, "control"] = (score_rows, y, pred)
        rows.append(
            _row(
                "train_test", layer, train.n_layers, "control", OK,
                uar=uar(y, pred, n_classes), war=war(y, pred), converged=ctrl.converged,
                n_train=len(fit_rows), n_test=len(score_rows), **common,
            )
        )  # fmt: skip
    return rows, scored


def _crossfit(test: ProbeSet, control, n_classes, Cs, cv, seed, max_iter):
    directions = crossfit_directions(test.speakers)
    if directions is None:
        return [
            _row("crossfit_test", layer, test.n_layers, task, ONE_SPEAKER)
            for layer in range(test.n_layers + 1)
            for task in TASKS
        ], {}
    ctrl_all = control_targets(test.items, control)
    plans = []  # per direction: CV splits, grouping, control rows (as test indices)
    for fit, score in directions:
        if len(np.unique(test.labels[fit])) < 2:
            status = "a half of the test speakers holds a single emotion class"
            return [
                _row("crossfit_test", layer, test.n_layers, task, status)
                for layer in range(test.n_layers + 1)
                for task in TASKS
            ], {}
        splits, groups = cv_folds(
            test.sessions[fit], test.speakers[fit], test.labels[fit], cv, seed,
            allow_utterances=True,
        )  # fmt: skip
        fit_rows, score_rows, status = _control_plan(
            test.items[fit],
            ctrl_all[fit],
            test.items[score],
            ctrl_all[score],
            bool(control),
            NO_CROSSFIT_ITEM,
        )
        if status == OK:
            fit_rows, score_rows = fit[fit_rows], score[score_rows]
        plans.append((fit, score, splits, groups, fit_rows, score_rows, status))
    control_ok = [p for p in plans if p[-1] == OK]
    control_status = OK if control_ok else plans[0][-1]
    groups = "+".join(dict.fromkeys(p[3] for p in plans))
    rows, scored = [], {}
    for layer in range(test.n_layers + 1):
        X = test.states[:, layer]
        pred = np.full(len(test), -1)
        ctrl_pred = np.full(len(test), -1)
        probes = []
        for fit, score, splits, _, fit_rows, score_rows, status in plans:
            probe = fit_probe(X[fit], test.labels[fit], splits, Cs, n_classes, max_iter)
            pred[score] = probe.predict(X[score])
            ctrl = None
            if status == OK:
                ctrl = fit_probe(
                    X[fit_rows], ctrl_all[fit_rows], (), Cs, n_classes, max_iter, C=probe.C
                )
                ctrl_pred[score_rows] = ctrl.predict(X[score_rows])
            probes.append((probe, ctrl))
        C = float(np.exp(np.mean([np.log(p.C) for p, _ in probes])))
        cv_scores = [p.cv_uar for p, _ in probes if not np.isnan(p.cv_uar)]
        scored["crossfit_test", layer, "emotion"] = (np.arange(len(test)), test.labels, pred)
        rows.append(
            _row(
                "crossfit_test", layer, test.n_layers, "emotion", OK,
                C=C, cv_uar=float(np.mean(cv_scores)) if cv_scores else np.nan,
                cv_groups=groups, uar=uar(test.labels, pred, n_classes),
                war=war(test.labels, pred), converged=all(p.converged for p, _ in probes),
                cv_unconverged=sum(p.cv_unconverged for p, _ in probes),
                n_train=sum(len(p[0]) for p in plans), n_test=len(test),
            )
        )  # fmt: skip
        if control_status != OK:
            rows.append(_row("crossfit_test", layer, test.n_layers, "control", control_status))
            continue
        hit = np.flatnonzero(ctrl_pred >= 0)
        y = ctrl_all[hit]
        scored["crossfit_test", layer, "control"] = (hit, y, ctrl_pred[hit])
        rows.append(
            _row(
                "crossfit_test", layer, test.n_layers, "control", OK,
                C=C, cv_groups=groups, uar=uar(y, ctrl_pred[hit], n_classes),
                war=war(y, ctrl_pred[hit]),
                converged=all(c.converged for _, c in probes if c is not None),
                n_train=sum(len(p[4]) for p in control_ok), n_test=len(hit),
            )
        )  # fmt: skip
    return rows, scored


def probe_layers(
    train: ProbeSet | None,
    test: ProbeSet,
    n_classes: int,
    Cs: Sequence[float],
    cv: int,
    seed: int,
    protocols: Sequence[str] = PROTOCOLS,
    control: Mapping[str, int] | None = None,
    max_iter: int = MAX_ITER,
    band_resamples: int = 0,
) -> pd.DataFrame:
    """The probing table (module docstring) of ``protocols`` (``train_test`` needs ``train``).

    ``control``: item -> control label (:func:`control_labels` over the whole corpus, as the
    workflow passes it); None derives it from the rows of ``train`` and ``test``.
    ``band_resamples``: resamples of the speaker band, whose rows follow (module docstring;
    drawn with ``seed``); 0, the default, leaves the band rows out.
    """
    if band_resamples and int(band_resamples) < 2:
        raise ValueError(f"band_resamples: 0 (no band) or at least 2, got {band_resamples}")
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown probing protocols {sorted(unknown)}; known: {PROTOCOLS}")
    if "train_test" in protocols:
        if train is None:
            raise ValueError("the train_test protocol needs the train split's states")
        if train.n_layers != test.n_layers:
            raise ValueError(
                f"train has {train.n_layers + 1} layers of states, test {test.n_layers + 1}"
            )
    if control is None:
        sets = [s for s in (train, test) if s is not None]
        control = control_labels(
            np.concatenate([s.items for s in sets]),
            np.concatenate([s.labels for s in sets]),
            n_classes,
            seed,
        )
    rows, scored = [], {}
    # One BLAS/OpenMP thread: these matrices are small (N x D, N ~ 100s), and on a shared
    # CPU idle-spinning BLAS threads made the fits ten times slower.
    with threadpool_limits(limits=1):
        for protocol in PROTOCOLS:
            if protocol not in protocols:
                continue
            if protocol == "train_test":
                got = _train_test(train, test, control, n_classes, Cs, cv, seed, max_iter)
            else:
                got = _crossfit(test, control, n_classes, Cs, cv, seed, max_iter)
            rows += got[0]
            scored.update(got[1])
    table = pd.DataFrame(rows)
    emotion = table["task"] == "emotion"
    control_rows = table[~emotion].set_index(["protocol", "layer"])
    key = pd.MultiIndex.from_frame(table[["protocol", "layer"]])
    for metric in ("uar", "war"):
        other = control_rows[metric].reindex(key).to_numpy()
        table[f"selectivity_{metric}"] = np.where(emotion, table[metric] - other, np.nan)
    if band_resamples:
        band = _band_rows(table, scored, test.speakers, n_classes, band_resamples, seed)
        table = pd.concat([table, band], ignore_index=True)
    return table


# --------------------------------------------------------------------------- reading the corpus


def _manifest_frame(manifest) -> pd.DataFrame:
    from serlens.corpus.manifest import read_manifest

    if isinstance(manifest, pd.DataFrame):
        frame = manifest.copy()
        if "item" not in frame.columns:
            frame["item"] = ""
        frame["item"] = frame["item"].fillna("").astype(str)
        return frame
    return read_manifest(Path(manifest))


def corpus_control(manifest: pd.DataFrame, classes: Sequence[str], seed: int) -> dict[str, int]:
    """:func:`control_labels` over every utterance of the manifest (the same in every fold)."""
    from serlens.train.data import label_indices

    return control_labels(
        manifest["item"].to_numpy(dtype=str),
        label_indices(manifest["label"], list(classes)),
        len(classes),
        seed,
    )


def probe_set(states: np.ndarray, split: Split, manifest: pd.DataFrame, source: str) -> ProbeSet:
    """A split's :class:`ProbeSet`: speakers, sessions and items looked up in the manifest."""
    info = manifest.drop_duplicates("utt_id").set_index("utt_id")
    missing = [u for u in split.utt_ids if u not in info.index]
    if missing:
        raise CorpusError(
            f"{source}: no speaker for utterances {missing[:3]} ({len(missing)} in all); "
            "rebuild the manifest."
        )
    rows = info.loc[list(split.utt_ids)]
    return ProbeSet(
        states=states,
        labels=split.labels,
        speakers=rows["speaker"].astype(str).to_numpy(),
        sessions=rows["session"].astype(str).to_numpy(),
        items=rows["item"].to_numpy(dtype=str),
    )


@torch.inference_mode()
def pooled_states(run: TrainedRun, split: Split, batch_size: int) -> np.ndarray:
    """(N, L + 1, D) masked-mean pooled hidden states of ``split`` through ``run.encoder``, in split order."""
    out = None
    for idx, batch in run.batches(split, batch_size):
        states = pooled_layer_states(run.encoder, batch).float().cpu().numpy()
        if out is None:
            out = np.empty((len(split), *states.shape[1:]), dtype=np.float32)
        out[idx] = states
    return out


def _cached_states(features_path: Path, run: TrainedRun, split: Split) -> np.ndarray:
    from safetensors import safe_open

    from serlens.train.features import load_features

    with safe_open(str(features_path), framework="pt") as handle:
        meta = handle.metadata()
    if meta.get("policy") != run.policy or float(meta.get("max_seconds", "nan")) != float(
        run.max_seconds
    ):
        raise ConfigError(
            f"{features_path}: cached with input policy {meta.get('policy')!r}, max_seconds {meta.get('max_seconds')}, "
            f"but the run uses {run.policy!r}, {run.max_seconds} (config audio.*); rerun the features rule."
        )
    return load_features(features_path, split.utt_ids).numpy()


def compute_probing(
    run: TrainedRun,
    cfg: dict,
    seed: int,
    manifest: Path | pd.DataFrame | None = None,
    features_path: Path | None = None,
    band_resamples: int = 0,
) -> pd.DataFrame:
    """Probe every layer of ``run`` for emotion and the control task (table: module docstring;
    ``band_resamples`` > 0 adds the speaker band's rows).

    Frozen runs: both protocols, states from the feature cache at ``features_path`` (no
    encoder pass) or, without one, from one pass of ``run.encoder``. LoRA runs: the cross-fit
    on the test split only, states from the adapted encoder. ``manifest`` (its path or
    frame: ``utt_id, speaker, session``, optional ``item``, ``label`` for the control labels)
    gives the speakers, sessions and items.
    """
    if manifest is None:
        raise ValueError(
            "compute_probing needs the run's manifest (path or frame) for speakers, sessions and items."
        )
    source = str(manifest) if not isinstance(manifest, pd.DataFrame) else "manifest"
    frame = _manifest_frame(manifest)
    control = corpus_control(frame, run.classes, seed)
    train, test = run.splits["train"], run.splits["test"]
    if run.is_lora:
        if features_path is not None:
            raise ValueError(
                f"{features_path}: the feature cache holds pre-trained states; a LoRA run ({run.method}) is probed "
                "on its adapted encoder, so pass no features_path."
            )
        test_set = probe_set(pooled_states(run, test, cfg["batch_size"]), test, frame, source)
        train_set, protocols = None, ("crossfit_test",)
    else:
        if features_path is not None:
            states = [_cached_states(Path(features_path), run, s) for s in (train, test)]
        else:
            states = [pooled_states(run, s, cfg["batch_size"]) for s in (train, test)]
        train_set = probe_set(states[0], train, frame, source)
        test_set = probe_set(states[1], test, frame, source)
        protocols = PROTOCOLS
    return probe_layers(
        train_set,
        test_set,
        n_classes=len(run.classes),
        Cs=cfg["probe_Cs"],
        cv=cfg["probe_cv_folds"],
        seed=seed,
        protocols=protocols,
        control=control,
        band_resamples=band_resamples,
    )


# --------------------------------------------------------------------------- the workflow's analysis


def _compute(run, settings) -> pd.DataFrame:
    """Frozen runs: both protocols on the feature cache; LoRA runs: the cross-fit on their own
    pass's test states (the adapter trained on the train split). With the speaker band's rows
    (:data:`BAND_RESAMPLES` resamples seeded by ``analysis_seed``)."""
    from serlens.corpus.manifest import read_manifest
    from serlens.train.features import load_features

    manifest_path = run.path("manifest")
    manifest = read_manifest(manifest_path)
    seed = settings["seed"]
    control = corpus_control(manifest, run.classes, seed)
    train, test = run.splits["train"], run.splits["test"]
    source = str(manifest_path)
    if run.method.trains_encoder:
        states = run.states("states")
        if states.utt_ids("test") != list(test.utt_ids):
            raise ValueError(
                f"{states.path}: test utterances differ from the fold's; rerun its pass."
            )
        train_set, protocols = None, ("crossfit_test",)
        test_set = probe_set(states["test/pooled"], test, manifest, source)
    else:
        both = load_features(run.path("features"), [*train.utt_ids, *test.utt_ids]).numpy()
        train_set = probe_set(both[: len(train)], train, manifest, source)
        test_set = probe_set(both[len(train) :], test, manifest, source)
        protocols = PROTOCOLS
    return probe_layers(
        train_set,
        test_set,
        n_classes=len(run.classes),
        Cs=settings["probe_Cs"],
        cv=settings["probe_cv_folds"],
        seed=seed,
        protocols=protocols,
        control=control,
        band_resamples=BAND_RESAMPLES,
    )


def _draw(tables, model, context):
    from serlens.report.figures import probing_figure

    return probing_figure(tables["probing"], model, context["n_classes"])


def _reads(method) -> bool:
    return method.readout == "last"


def _spec():
    from serlens.analysis.registry import AnalysisSpec, FigureSpec, TableSpec

    return AnalysisSpec(
        name="probing",
        compute=_compute,
        applies_to=_reads,
        reads=frozenset({"states", "features"}),
        keys=("probe_cv_folds", "probe_Cs"),
        uses_seed=True,
        table=TableSpec(
            ("protocol", "layer", "depth", "task"),
            ("uar", "war", "selectivity_uar", "selectivity_war", "cv_uar", "C", "n_test"),
        ),
        figures=(FigureSpec("probing", _draw, ("probing",), "Probing"),),
        doc=(
            "session-grouped logistic probes of every layer (train→test for frozen runs, "
            "cross-fitted over test-speaker halves for all), with an item-level control task "
            "and a speaker-bootstrap band of each fold's UAR"
        ),
    )


SPEC = _spec()
