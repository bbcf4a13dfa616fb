"""Layer-wise linear probes of emotion, with a control task that measures what a probe memorises.

For each of the encoder's L + 1 hidden states (transformers' convention: the conv + position
embedding, the outputs of layers 1..L-1, and the final-LayerNorm output of layer L), every
utterance is reduced to the masked mean over its audio frames, and a linear probe is fitted
on the fold's train split and scored on its test split.

The probe
---------
Standardised features (``StandardScaler`` fitted on the training rows only) and an
L2-regularised multinomial logistic regression (scikit-learn, lbfgs, ``class_weight =
"balanced"``, so every class weighs the same in the loss whatever its frequency)::

    min_{W, b}  ½‖W‖²_F + C Σ_i w_{y_i} · (−log softmax(W x_i + b)_{y_i}),   w_k = N / (K N_k)

The inverse strength ``C`` is chosen from ``analysis.probe_Cs`` by cross-validation on the
train split *grouped by speaker* (``GroupKFold`` with ``analysis.probe_cv_folds`` splits: no
speaker is in both the fitting and the validation part, so the choice of C does not reward
memorising speakers), maximising the mean validation UAR; ties go to the smallest C (the
strongest regularisation). The scaler is refitted inside every CV split. The probe is then
refitted on the whole train split with the chosen C and scored on the test split: UAR
(:func:`serlens.metrics.uar`) and WAR (accuracy).

The control task (Hewitt & Liang 2019, "Designing and interpreting probes with control
tasks", EMNLP)
--------------------------------------------------------------------------------------------
A control task has the output space of the real one but labels that carry no information
about the input beyond what the probe can memorise. Here each split's labels are permuted
*within speaker* (one seeded permutation, shared by every layer): each speaker keeps its
label multiset, so a probe that only learned speaker identity or per-speaker label priors
scores as well on the control task as on the real one. The control probe goes through the
same pipeline (its own C by the same grouped CV) and is scored against the permuted test
labels. Selectivity = task − control (Hewitt & Liang 2019, §3), for UAR and WAR.
Because test speakers are held out (leave-one-session-out), the control task's test
score sits near chance (UAR 1/K), so selectivity ≈ task UAR − chance; it is reported so
that a probe that only fits speaker structure shows up as non-selective.

Output (tidy, one row per layer × task)
---------------------------------------
``layer`` (0..L), ``depth`` (= layer / L), ``task`` (``emotion`` or ``control``), ``C`` (the
chosen inverse strength), ``cv_uar`` (mean grouped-CV UAR at that C), ``uar``, ``war`` (on
the test split), ``converged`` (the final fit converged), ``cv_unconverged`` (number of CV
fits that stopped without converging; lbfgs warnings are recorded here, not dropped),
``n_train``, ``n_test``, and ``selectivity_uar``, ``selectivity_war`` (emotion − control of
the same layer) on the ``emotion`` rows, empty (NaN) on the ``control`` rows.
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
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from serlens.analysis.runs import TrainedRun
from serlens.errors import ConfigError, CorpusError
from serlens.metrics import uar, war
from serlens.models.encoder import pooled_layer_states
from serlens.train.data import Split

__all__ = [
    "Probe",
    "compute_probing",
    "fit_probe",
    "permute_within_groups",
    "pooled_states",
    "probe_layers",
    "speaker_folds",
    "speakers_from_manifest",
]

MAX_ITER = 500


def permute_within_groups(
    labels: np.ndarray, groups: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Control labels: ``labels`` shuffled among the items of each group (Hewitt & Liang 2019).

    Every group keeps its multiset of labels; only which of its items carries which label
    changes. Groups are visited in sorted order, so the result depends only on ``rng``'s state.
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if labels.shape != groups.shape:
        raise ValueError(f"labels {labels.shape} and groups {groups.shape} differ in shape")
    out = labels.copy()
    for group in np.unique(groups):
        idx = np.flatnonzero(groups == group)
        out[idx] = labels[rng.permutation(idx)]
    return out


def speaker_folds(groups: np.ndarray, n_splits: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit, validation) index pairs of ``GroupKFold``: every speaker falls in exactly one validation part."""
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise ConfigError(
            f"analysis.probe_cv_folds = {n_splits} but the train split has only {n_groups} speakers; "
            f"set analysis.probe_cv_folds to at most {n_groups}."
        )
    return list(GroupKFold(n_splits=n_splits).split(np.zeros((len(groups), 1)), groups=groups))


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


def fit_probe(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    Cs: Sequence[float],
    cv: int,
    n_classes: int,
    max_iter: int = MAX_ITER,
) -> Probe:
    """Standardise + L2 multinomial logistic regression, C chosen by speaker-grouped CV (mean UAR).

    Within each CV split the Cs are fitted from the strongest regularisation up, each fit
    warm-started from the previous solution, so the path costs little more than one fit.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    Cs = sorted(float(c) for c in Cs)
    splits = speaker_folds(groups, cv)
    scores = np.empty((len(splits), len(Cs)))
    cv_unconverged = 0
    for f, (fit_idx, val_idx) in enumerate(splits):
        scaler = StandardScaler().fit(X[fit_idx])
        X_fit, X_val = scaler.transform(X[fit_idx]), scaler.transform(X[val_idx])
        clf = _logistic(Cs[0], max_iter, warm_start=True)
        for j, C in enumerate(Cs):
            cv_unconverged += not _fit_logged(clf.set_params(C=C), X_fit, y[fit_idx])
            scores[f, j] = uar(y[val_idx], clf.predict(X_val), n_classes)
    mean = scores.mean(axis=0)
    best = int(np.argmax(mean))  # first maximum = smallest C among ties
    model = make_pipeline(StandardScaler(), _logistic(Cs[best], max_iter))
    converged = _fit_logged(model, X, y)
    return Probe(
        model=model,
        C=Cs[best],
        cv_uar=float(mean[best]),
        converged=converged,
        cv_unconverged=cv_unconverged,
    )


def probe_layers(
    train_states: np.ndarray,
    train_labels: np.ndarray,
    train_speakers: np.ndarray,
    test_states: np.ndarray,
    test_labels: np.ndarray,
    test_speakers: np.ndarray,
    n_classes: int,
    Cs: Sequence[float],
    cv: int,
    seed: int,
    max_iter: int = MAX_ITER,
) -> pd.DataFrame:
    """The probing table (see the module docstring) from (N, L + 1, D) pooled states of both splits."""
    n_layers = train_states.shape[1] - 1
    if test_states.shape[1] != n_layers + 1:
        raise ValueError(f"train has {n_layers + 1} layers of states, test {test_states.shape[1]}")
    rng = np.random.default_rng(seed)
    labels = {
        "emotion": (np.asarray(train_labels), np.asarray(test_labels)),
        "control": (
            permute_within_groups(train_labels, train_speakers, rng),
            permute_within_groups(test_labels, test_speakers, rng),
        ),
    }
    rows = []
    # One BLAS/OpenMP thread: these matrices are small (N x D, N ~ 100s), and on a shared
    # CPU idle-spinning BLAS threads made the fits ten times slower.
    with threadpool_limits(limits=1):
        for layer in range(n_layers + 1):
            for task, (y_train, y_test) in labels.items():
                probe = fit_probe(
                    train_states[:, layer], y_train, train_speakers, Cs, cv, n_classes, max_iter
                )
                pred = probe.model.predict(np.asarray(test_states[:, layer], dtype=np.float64))
                rows.append(
                    {
                        "layer": layer,
                        "depth": layer / n_layers if n_layers else 0.0,
                        "task": task,
                        "C": probe.C,
                        "cv_uar": probe.cv_uar,
                        "uar": uar(y_test, pred, n_classes),
                        "war": war(y_test, pred),
                        "converged": probe.converged,
                        "cv_unconverged": probe.cv_unconverged,
                        "n_train": len(y_train),
                        "n_test": len(y_test),
                    }
                )
    table = pd.DataFrame(rows)
    emotion = table["task"] == "emotion"
    control = table[~emotion].set_index("layer")
    for metric in ("uar", "war"):
        table[f"selectivity_{metric}"] = np.where(
            emotion, table[metric] - table["layer"].map(control[metric]), np.nan
        )
    return table


def speakers_from_manifest(manifest_path: Path) -> dict[str, str]:
    """utt_id -> speaker, from the manifest's ``speaker`` column."""
    from serlens.corpus.manifest import read_manifest

    manifest = read_manifest(manifest_path)
    return dict(zip(manifest["utt_id"], manifest["speaker"].astype(str), strict=True))


def _lookup_speakers(
    speakers: Mapping[str, str], utt_ids: Sequence[str], source: str
) -> np.ndarray:
    missing = [u for u in utt_ids if u not in speakers]
    if missing:
        raise CorpusError(
            f"{source}: no speaker for utterances {missing[:3]} ({len(missing)} in all); rebuild the manifest."
        )
    return np.array([str(speakers[u]) for u in utt_ids])


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
    features_path: Path | None = None,
    manifest_path: Path | None = None,
    speakers: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Probe every layer of ``run`` for emotion and for the control task (table: module docstring).

    States: for frozen runs from the feature cache at ``features_path`` (no encoder pass);
    without a cache, and for LoRA runs, from one pass of ``run.encoder`` (adapters live) over
    the train and test splits. Speakers (for the grouped CV and the control permutation) come
    from ``speakers`` (utt_id -> speaker) or else the manifest at ``manifest_path``.
    """
    train, test = run.splits["train"], run.splits["test"]
    if speakers is None:
        if manifest_path is None:
            raise ValueError(
                "compute_probing needs the speakers: pass manifest_path (the run's manifest.tsv) or speakers."
            )
        speakers = speakers_from_manifest(manifest_path)
    source = str(manifest_path) if manifest_path is not None else "speakers"
    train_speakers = _lookup_speakers(speakers, train.utt_ids, source)
    test_speakers = _lookup_speakers(speakers, test.utt_ids, source)
    if features_path is not None:
        if run.is_lora:
            raise ValueError(
                f"{features_path}: the feature cache holds pre-trained states; a LoRA run ({run.method}) is probed "
                "on its adapted encoder, so pass no features_path."
            )
        train_states = _cached_states(Path(features_path), run, train)
        test_states = _cached_states(Path(features_path), run, test)
    else:
        train_states = pooled_states(run, train, cfg["batch_size"])
        test_states = pooled_states(run, test, cfg["batch_size"])
    return probe_layers(
        train_states,
        train.labels,
        train_speakers,
        test_states,
        test.labels,
        test_speakers,
        n_classes=len(run.classes),
        Cs=cfg["probe_Cs"],
        cv=cfg["probe_cv_folds"],
        seed=seed,
    )


# --------------------------------------------------------------------------- the workflow's analysis


def _compute(run, settings) -> pd.DataFrame:
    """States: the frozen encoder's from the feature cache; a LoRA run's from its own pass."""
    from serlens.train.features import load_features

    train, test = run.splits["train"], run.splits["test"]
    if run.method.trains_encoder:
        states = run.states("states")
        for split, name in ((train, "train"), (test, "test")):
            if states.utt_ids(name) != list(split.utt_ids):
                raise ValueError(
                    f"{states.path}: {name} utterances differ from the fold's; rerun its pass."
                )
        train_states, test_states = states["train/pooled"], states["test/pooled"]
    else:
        features = run.path("features")
        train_states = load_features(features, train.utt_ids).numpy()
        test_states = load_features(features, test.utt_ids).numpy()
    source = str(run.path("manifest"))
    return probe_layers(
        train_states,
        train.labels,
        _lookup_speakers(run.speakers, train.utt_ids, source),
        test_states,
        test.labels,
        _lookup_speakers(run.speakers, test.utt_ids, source),
        n_classes=len(run.classes),
        Cs=settings["probe_Cs"],
        cv=settings["probe_cv_folds"],
        seed=settings["seed"],
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
            ("layer", "depth", "task"),
            ("uar", "war", "selectivity_uar", "selectivity_war", "cv_uar", "C"),
        ),
        figures=(FigureSpec("probing", _draw, ("probing",), "Probing"),),
        doc="speaker-grouped logistic probes of every layer, with a within-speaker control task",
    )


SPEC = _spec()
