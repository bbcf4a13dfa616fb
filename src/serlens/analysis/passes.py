"""Encoder passes: the one job per run that loads the model and runs it for every analysis.

Each (encoder variant x utterance set) forward pass is computed once and written to
``states.safetensors``; the analyses are light jobs that read it and never import
transformers or peft (see :mod:`serlens.analysis.registry`). Two kinds of pass:

* ``base`` (one per model, shared by every run of that model): the pre-trained encoder on
  every utterance of the corpus (split ``all``); every fold's test split and analysis sample
  are rows of it (:meth:`States.fold_view`, the rows' ids in the metadata).
* a run with its own encoder (LoRA): the adapted encoder on the test split, on the whole
  training split, and the A/B activation and gradient statistics on the analysis sample
  (``ab.safetensors``: uncentred and centred spectra, gradient norms, for the trained
  adapters and the ``analysis.untrained_baseline``; see :mod:`serlens.analysis.ab_dynamics`).
  The A/B part is one forward and backward of two adapter settings over ``train_sample``
  utterances; its accumulators are per-module Grams and column sums, whatever the sample.

What is stored, per utterance so that later statistics can resample speakers
(``{split}/...`` keys, rows in the split's order, ``{split}/utt_ids`` in the metadata):

* ``pooled``: ``(N, L + 1, D)`` masked mean over audio frames of each hidden state
  (transformers' convention: ``resid[0..L-1]``, then the final LayerNorm of ``resid[L]``);
  what probing and CKA read.
* ``normalised``: ``(N, L + 1, D)`` masked mean of ``LN_final(resid[l])`` (layer L: the
  ``last_hidden_state``); what the logit and tuned lens read.
* ``resid_last``: ``(N, D)`` masked mean of ``resid[L]`` *before* the final LayerNorm (test
  split and the base pass's ``all`` only). With ``pooled[:, :L]`` it completes the pooled raw
  residual stream ``resid[0..L]`` (:func:`raw_residual_states`) that the paper's logit lens
  reads (:mod:`serlens.analysis.logit_lens`, lens ``paper_no_final_ln``). Files of an older
  pass (``states_format`` below 2 in the metadata) lack it; they still load, and the logit
  lens then leaves the paper's rows out and says so.
* ``contrib``: ``(N, L, 3, 2)`` float64 sums over audio frames of the residual norm ratio and
  cosine of each block's attention, MLP and whole update
  (:func:`serlens.analysis.contributions.contribution_sums`), and ``frames`` ``(N,)`` the
  audio frames of each utterance: the frame-weighted mean of a fold is
  ``Σ_u contrib_u / Σ_u frames_u``.

``states_format`` (:data:`STATES_FORMAT`, in the metadata of every states file and in
:func:`pass_settings`, so that a pass written in an older format is rerun by the workflow)
numbers what a pass stores.

The analysis sample is ``balanced_sample(train labels, train_sample, seed)`` with the
workflow's ``seed``: the same utterances for every run of a fold, whatever the run's seed.
Memory is bounded by one batch of frame-level states plus the pooled arrays.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from serlens.analysis.contributions import COMPONENTS, METRICS, layer_components
from serlens.models.encoder import attention_mask, embed, masked_mean

log = logging.getLogger(__name__)

#: Keys of ``config["analysis"]`` the passes read: changing one reruns the passes.
PASS_KEYS = ("batch_size", "train_sample")
#: Keys only the A/B statistics of a run's pass read (:func:`pass_settings` with ``ab``).
AB_KEYS = ("untrained_baseline", "paper_estimator_input", "out_grad_band")
#: Keys only the causal tests of a run's pass read (:mod:`serlens.analysis.causal`).
CAUSAL_KEYS = ("causal_stride", "causal_ablation")
#: Read by the A/B statistics only when ``untrained_baseline`` is ``paper`` (its std).
PAPER_BASELINE_KEYS = ("untrained_init_std",)
#: What a states file holds; 2 added ``resid_last`` (the pooled pre-LayerNorm last layer).
#: A pass setting (:func:`pass_settings`), so raising it reruns the passes.
STATES_FORMAT = 2
#: What a run's pass logs for each of its parts (``states``, ``ab_statistics``, ``causal``);
#: bench/job_seconds.py splits the passes' compute by it.
PART_LINE = "part compute: %s %.3f s"


@contextlib.contextmanager
def part_time(name: str):
    """Time one part of a pass and log it as :data:`PART_LINE`."""
    tic = time.perf_counter()
    try:
        yield
    finally:
        log.info(PART_LINE, name, time.perf_counter() - tic)


def pass_settings(config: dict, ab: bool = True, causal: bool | None = None) -> dict:
    """Everything an encoder pass reads (the rule's params).

    ``ab``: the pass also writes the A/B statistics (a run's pass; the base pass does not
    and can leave them out, so that changing the baseline does not rerun it). The std of
    the ``paper`` baseline is passed only with that baseline, so that every key passed is
    read and changing the std does not rerun a ``matched_scale`` pass. ``causal`` (default:
    as ``ab``): the pass also computes the causal tests (a fully fine-tuned run's pass has
    them without A/B statistics).
    """
    analysis = config["analysis"]
    keys = [*PASS_KEYS]
    if ab:
        keys += AB_KEYS
        if analysis["untrained_baseline"] == "paper":
            keys += PAPER_BASELINE_KEYS
    if ab if causal is None else causal:
        keys += CAUSAL_KEYS
    return {
        "classes": list(config["corpus"]["classes"]),
        "audio": dict(config["audio"]),
        "seed": config["analysis_seed"],
        "states_format": STATES_FORMAT,
        **{key: analysis[key] for key in keys},
    }


def states_metadata(settings) -> dict[str, str]:
    """The metadata every states file carries: its ``states_format``.

    The format is this code's (:data:`STATES_FORMAT`); a ``states_format`` in ``settings``
    (the rule's params) must be the same, else the workflow passed a stale setting.
    """
    asked = settings.get("states_format", STATES_FORMAT)
    if asked != STATES_FORMAT:
        raise ValueError(
            f"states_format {asked!r} asked, but this pass writes format {STATES_FORMAT}"
        )
    return {"states_format": str(STATES_FORMAT)}


def raw_residual_states(pooled: np.ndarray, resid_last: np.ndarray) -> np.ndarray:
    """The pooled residual stream without the final LayerNorm, ``(N, L + 1, D)``: layers
    0..L-1 of ``pooled`` (transformers' hidden states ``resid[0..L-1]``, never normalised)
    and ``resid_last`` (pooled ``resid[L]`` before the final LayerNorm) as layer L."""
    if pooled.shape[0] != resid_last.shape[0] or pooled.shape[2] != resid_last.shape[-1]:
        raise ValueError(
            f"pooled {pooled.shape} and resid_last {resid_last.shape} do not fit together"
        )
    return np.concatenate([pooled[:, :-1], resid_last[:, None]], axis=1)


def utterance_contributions(parts, frame_mask: torch.Tensor) -> torch.Tensor:
    """``(B, 3, 2)`` float64 per-utterance frame sums of (component x metric) of one block."""
    from serlens.analysis.contributions import residual_cosine, residual_norm_ratio

    updates = {
        "attn": parts.attn_out,
        "mlp": parts.mlp_out,
        "attn+mlp": parts.attn_out + parts.mlp_out,
    }
    weights = frame_mask.to(torch.float64)
    out = torch.empty(frame_mask.shape[0], len(COMPONENTS), len(METRICS), dtype=torch.float64)
    for c, component in enumerate(COMPONENTS):
        update = updates[component]
        for m, fn in enumerate((residual_norm_ratio, residual_cosine)):
            out[:, c, m] = (fn(update, parts.resid_pre).double() * weights).sum(dim=1).cpu()
    return out


@torch.inference_mode()
def batch_states(encoder, batch, contributions: bool = True) -> dict[str, torch.Tensor]:
    """One block-by-block pass over a batch: pooled, normalised, resid_last, frames and
    (optionally) contributions (module docstring)."""
    x = embed(encoder, batch.mel)
    mask = attention_mask(batch, x.dtype)
    frame_mask = batch.frame_mask
    norm = encoder.layer_norm
    pooled, normalised, contrib = [masked_mean(x, frame_mask)], [], []
    normalised.append(masked_mean(norm(x), frame_mask))
    n_layers = len(encoder.layers)
    for index, layer in enumerate(encoder.layers, start=1):
        parts = layer_components(layer, x, mask)
        if contributions:
            contrib.append(utterance_contributions(parts, frame_mask))
        x = parts.resid_post
        if index < n_layers:
            pooled.append(masked_mean(x, frame_mask))
            normalised.append(masked_mean(norm(x), frame_mask))
    last = masked_mean(norm(x), frame_mask)
    pooled.append(last)
    normalised.append(last)
    out = {
        "pooled": torch.stack(pooled, dim=1).float().cpu(),
        "normalised": torch.stack(normalised, dim=1).float().cpu(),
        "resid_last": masked_mean(x, frame_mask).float().cpu(),  # resid[L] before the final LN
        "frames": frame_mask.sum(dim=1).to(torch.int64).cpu(),
    }
    if contributions:
        out["contrib"] = torch.stack(contrib, dim=1)
    return out


def split_states(
    run, split, batch_size: int, indices: np.ndarray | None = None, contributions: bool = True
) -> dict[str, np.ndarray]:
    """:func:`batch_states` over ``split`` (or its rows ``indices``), rows in the order asked."""
    idx = np.arange(len(split)) if indices is None else np.asarray(indices)
    row_of = {int(i): k for k, i in enumerate(idx)}
    out: dict[str, np.ndarray] = {}
    for chunk, batch in run.batches(split, batch_size, idx):
        rows = np.array([row_of[int(i)] for i in chunk])
        for key, value in batch_states(run.encoder, batch, contributions).items():
            value = value.numpy()
            if key not in out:
                out[key] = np.zeros((len(idx), *value.shape[1:]), dtype=value.dtype)
            out[key][rows] = value
    return out


def write_states(
    path: Path,
    arrays: dict[str, dict[str, np.ndarray]],
    utt_ids: dict,
    metadata: dict[str, str] | None = None,
) -> None:
    """``{split: {name: array}}`` to one safetensors file (written aside, then renamed);
    ``metadata``: further string entries beside the rows' ids."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{split}/{name}": torch.from_numpy(np.ascontiguousarray(value))
        for split, named in arrays.items()
        for name, value in named.items()
    }
    metadata = {
        **(metadata or {}),
        **{f"{split}/utt_ids": json.dumps(list(ids)) for split, ids in utt_ids.items()},
    }
    tmp = path.with_name(path.name + ".part")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


class States:
    """A ``states.safetensors`` opened for reading: ``states["test/pooled"]``, ``utt_ids("test")``."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no encoder states; rerun its pass rule.")
        with safe_open(str(self.path), framework="numpy") as handle:
            self.keys = set(handle.keys())
            self.metadata = handle.metadata() or {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.keys:
            raise KeyError(f"{self.path}: no {key!r}; it holds {sorted(self.keys)}")
        with safe_open(str(self.path), framework="numpy") as handle:
            return handle.get_tensor(key)

    def utt_ids(self, split: str) -> list[str]:
        return json.loads(self.metadata[f"{split}/utt_ids"])

    def fold_view(self, fold: int) -> FoldView:
        """The ``test``, ``train``, ``dev`` and ``train_sample`` rows of ``fold`` of a pass over
        ``all`` utterances."""
        return FoldView(self, int(fold))


class FoldView:
    """``view["test/pooled"]``: the rows of ``all/pooled`` that belong to a fold's split."""

    def __init__(self, states: States, fold: int):
        self.states, self.fold, self.path = states, fold, states.path
        self._row = {u: i for i, u in enumerate(states.utt_ids("all"))}

    def utt_ids(self, split: str) -> list[str]:
        key = f"fold{self.fold}/{split}/utt_ids"
        if key not in self.states.metadata:
            raise KeyError(f"{self.path}: no fold {self.fold} {split} rows; rerun its pass rule.")
        return json.loads(self.states.metadata[key])

    def __getitem__(self, key: str) -> np.ndarray:
        split, name = key.split("/", 1)
        rows = [self._row[u] for u in self.utt_ids(split)]
        return self.states[f"all/{name}"][rows]


def analysis_sample(run, settings: dict) -> np.ndarray:
    from serlens.analysis.runs import balanced_sample

    return balanced_sample(run.splits["train"].labels, settings["train_sample"], settings["seed"])


def every_utterance(run):
    """A fold's run as the base pass sees a corpus: one split ``all`` (train, dev, test in
    that order) and the folds table that puts them back (``fold`` 1)."""
    import dataclasses

    import pandas as pd

    from serlens.train.data import Split

    names = ("train", "dev", "test")
    parts = [run.splits[name] for name in names]
    every = Split(
        [u for part in parts for u in part.utt_ids],
        np.concatenate([part.labels for part in parts]),
        np.concatenate([part.durations for part in parts]),
        [p for part in parts for p in part.paths],
        None
        if any(part.waves is None for part in parts)
        else [w for part in parts for w in part.waves],
    )
    folds = pd.DataFrame(
        [
            {"utt_id": u, "fold": 1, "split": name}
            for name in names
            for u in run.splits[name].utt_ids
        ]
    )
    return dataclasses.replace(run, splits={"all": every}), folds


def base_pass(run, folds, settings: dict, out: Path) -> None:
    """The pre-trained encoder's states on every utterance (``run.splits["all"]``), with each
    fold's test split and analysis sample recorded as row ids (``folds``: folds.tsv)."""
    from serlens.analysis.runs import balanced_sample

    every = run.splits["all"]
    with run.adapter_disabled():
        arrays = {"all": split_states(run, every, settings["batch_size"])}
    ids = {"all": every.utt_ids}
    label_of = dict(zip(every.utt_ids, every.labels, strict=True))
    for fold in sorted(folds["fold"].unique()):
        rows = folds[folds["fold"] == fold]
        test = rows.loc[rows["split"] == "test", "utt_id"].tolist()
        train = rows.loc[rows["split"] == "train", "utt_id"].tolist()
        labels = np.array([label_of[u] for u in train])
        sample = balanced_sample(labels, settings["train_sample"], settings["seed"])
        ids[f"fold{fold}/test"] = test
        ids[f"fold{fold}/train"] = train
        ids[f"fold{fold}/dev"] = rows.loc[rows["split"] == "dev", "utt_id"].tolist()
        ids[f"fold{fold}/train_sample"] = [train[i] for i in sample]
    write_states(out, arrays, ids, states_metadata(settings))


def adapted_pass(
    run,
    settings: dict,
    out: Path,
    ab_out: Path | None = None,
    causal_out: Path | None = None,
    epoch0: Path | None = None,
) -> None:
    """A run's own encoder on test, train, dev and the sample; A/B statistics if ``ab_out``;
    the causal interventions' logits (:mod:`serlens.analysis.causal`) if ``causal_out``
    (``epoch0``: the adapter at initialisation, for the A/B swap).

    ``test`` holds every state of :func:`batch_states` (``resid_last`` too: the paper's logit
    lens), ``train`` pooled and normalised states of every training utterance (probes, the
    tuned lens' fit), ``dev`` the normalised states (the tuned lens' early stopping).
    """
    test, train, dev = run.splits["test"], run.splits["train"], run.splits["dev"]
    sample = analysis_sample(run, settings)
    with part_time("states"):
        train_states = split_states(run, train, settings["batch_size"], contributions=False)
        dev_states = split_states(run, dev, settings["batch_size"], contributions=False)
        arrays = {
            "test": split_states(run, test, settings["batch_size"]),
            "train": {"pooled": train_states["pooled"], "normalised": train_states["normalised"]},
            "dev": {"normalised": dev_states["normalised"]},
            "train_sample": {"normalised": train_states["normalised"][sample]},
        }
    write_states(
        out,
        arrays,
        {
            "test": test.utt_ids,
            "train": train.utt_ids,
            "dev": dev.utt_ids,
            "train_sample": [train.utt_ids[i] for i in sample],
        },
        states_metadata(settings),
    )
    if ab_out is not None:
        from serlens.analysis.ab_dynamics import baseline_settings, write_ab_statistics

        baseline, init_std = baseline_settings(settings)
        with part_time("ab_statistics"):
            write_ab_statistics(
                run,
                sample,
                settings["batch_size"],
                baseline,
                settings["seed"],
                ab_out,
                init_std,
                paper_input=settings["paper_estimator_input"],
                out_grad_band=settings["out_grad_band"],
            )
    if causal_out is not None:
        from serlens.analysis.causal import causal_logits, write_causal

        with part_time("causal"):
            logits, variants = causal_logits(run, settings, epoch0)
            write_causal(causal_out, logits, variants, test.utt_ids, len(run.encoder.layers))
