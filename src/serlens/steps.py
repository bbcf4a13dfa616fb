"""The workflow's steps as functions of a validated config and paths.

The Snakemake scripts and the ``serlens`` command both call these, so a step run by hand
does exactly what the workflow does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

from serlens.config import digest
from serlens.corpus.folds import fixed_split_folds, fold_summary, leave_one_session_out
from serlens.corpus.manifest import build_manifest, read_manifest
from serlens.io import write_tsv_atomic

log = logging.getLogger("serlens")

#: The line every heavy job logs at its end; bench/job_seconds.py reads it beside the
#: job's Snakemake benchmark (wall time - compute = start-up, imports, model loads, writing).
COMPUTE_LINE = "job compute: %.3f s"


@contextlib.contextmanager
def compute_time():
    """Time the job's compute (encoder passes, training steps) and log it as :data:`COMPUTE_LINE`."""
    tic = time.perf_counter()
    try:
        yield
    finally:
        log.info(COMPUTE_LINE, time.perf_counter() - tic)


def synth_corpus(
    root: Path, utterances_per_speaker: int, seed: int, scripted_fraction: float = 0.5
) -> Path:
    """Generate the synthetic corpus at ``root``, replacing an older one."""
    from serlens.corpus.synth import write_synthetic_corpus

    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    with compute_time():
        return write_synthetic_corpus(
            root,
            utterances_per_speaker=utterances_per_speaker,
            seed=seed,
            scripted_fraction=scripted_fraction,
        )


def make_manifest(corpus: dict, root: Path, manifest_out: Path, summary_out: Path) -> pd.DataFrame:
    """Read the corpus (``corpus`` = ``config["corpus"]``), map labels, check audio; write both tables."""
    from serlens.corpus.registry import read_candidates, skipped_files

    candidates = read_candidates(corpus, Path(root))
    manifest, summary = build_manifest(
        candidates, corpus["classes"], corpus["merge"], corpus["on_bad_audio"]
    )
    skipped = skipped_files(corpus, Path(root))
    if skipped:  # files the reader leaves out by design are counted, never silently dropped
        rows = [("", "", f"skipped: {why}", n) for why, n in sorted(skipped.items())]
        summary = pd.concat([summary, pd.DataFrame(rows, columns=summary.columns)])
    write_tsv_atomic(summary, summary_out)
    write_tsv_atomic(manifest, manifest_out)
    counts = manifest["label"].value_counts().reindex(corpus["classes"]).to_dict()
    log.info(
        "manifest: %d utterances %s; dropped %d",
        len(manifest),
        counts,
        int(summary.query("status != 'kept'")["n"].sum()),
    )
    return manifest


def make_folds(
    dev: str,
    manifest_path: Path,
    folds_out: Path,
    grouping: str = "sessions",
    summary_out: Path | None = None,
) -> pd.DataFrame:
    """The corpus's folds: leave-one-session-out over its sessions or speaker groups
    (``dev`` = ``folds.dev``), its own split (``grouping`` "split") or the paper's
    dialog-prefix folds (``grouping`` "prefix"); ``summary_out``
    gets :func:`serlens.corpus.folds.fold_summary` (held-out speakers, text overlap)."""
    manifest = read_manifest(manifest_path)
    if grouping == "split":
        folds = fixed_split_folds(manifest)
    elif grouping == "prefix":  # the paper's dialog-prefix folds (protocol: prefix_folds)
        from serlens.corpus.folds import dialog_prefix_folds

        folds = dialog_prefix_folds(manifest, dev)
    else:
        folds = leave_one_session_out(manifest, dev)
    summary = fold_summary(manifest, folds)
    for row in summary.itertuples():
        if row.test_utts_item_in_train:
            log.warning(
                "fold %d: %d of %d test utterances say a sentence that also occurs in training "
                "(%d of %d test items); speaker-independent, not text-independent",
                row.fold,
                row.test_utts_item_in_train,
                row.n_test,
                row.test_items_in_train,
                row.test_items,
            )
    if summary_out is not None:
        write_tsv_atomic(summary, summary_out)
    write_tsv_atomic(folds, folds_out)
    return folds


def resolve_model(source: str, model: str, resources_dir: Path, out_json: Path) -> Path:
    """Resolve a weight source (``config["models"][model]``) to a model folder, recorded in ``out_json``."""
    from serlens.models.resolve import resolve_weights

    path = resolve_weights(source, Path(resources_dir))
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(
        json.dumps({"model": model, "source": source, "path": str(path.resolve())}, indent=2) + "\n"
    )
    return path


def model_path(weights_json: Path) -> Path:
    return Path(json.loads(Path(weights_json).read_text())["path"])


def device_and_threads(threads: int) -> str:
    """Claim a GPU of the pool for this job (local runs; SLURM binds its own), set CPU threads."""
    from serlens.gpu import claim_gpu

    claim_gpu()
    torch.set_num_threads(max(1, threads))
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_features(
    audio: dict,
    batch_size: int,
    weights_json: Path,
    manifest_path: Path,
    out_path: Path,
    threads: int = 1,
) -> None:
    """Cache every utterance's pooled layer states under the pre-trained encoder."""
    from serlens.models.encoder import load_encoder
    from serlens.train.features import cache_features

    device = device_and_threads(threads)
    encoder = load_encoder(model_path(weights_json)).to(device)
    with compute_time():
        cache_features(
            encoder,
            read_manifest(manifest_path),
            out_path,
            audio["input_policy"],
            audio["max_seconds"],
            batch_size,
            device,
        )


def encoder_pass(
    settings: dict,
    model: str,
    method: str,
    fold: int | None,
    manifest_path: Path,
    folds_path: Path,
    weights_json: Path,
    out: Path,
    run_dir: Path | None = None,
    ab_out: Path | None = None,
    threads: int = 1,
    causal_out: Path | None = None,
    epoch0: Path | None = None,
) -> None:
    """One model load, every forward pass the analyses of a run need (``method = "base"``: the
    pre-trained encoder on every utterance, for every run of the model; ``fold`` unused)."""
    from serlens.analysis.passes import adapted_pass, base_pass
    from serlens.analysis.runs import load_run

    device = device_and_threads(threads)
    run = load_run(
        settings, model, method, fold, manifest_path, folds_path, weights_json, run_dir, device
    )
    with compute_time():
        if method == "base":
            folds = pd.read_csv(folds_path, sep="\t", dtype={"utt_id": str})
            base_pass(run, folds, settings, out)
        else:
            adapted_pass(run, settings, out, ab_out, causal_out, epoch0)


def cross_eval(
    method: str,
    run_dir: Path,
    train_classes: list[str],
    test_manifest: Path,
    test_classes: list[str],
    out: Path,
    weights_json: Path,
    test_features: Path | None,
    audio: dict,
    batch_size: int,
    threads: int = 1,
) -> None:
    """One trained run scored on another corpus (:func:`serlens.cross_corpus.cross_predict`)."""
    from serlens.cross_corpus import cross_predict

    device = device_and_threads(threads)
    with compute_time():
        cross_predict(
            method,
            Path(run_dir),
            list(train_classes),
            Path(test_manifest),
            list(test_classes),
            Path(out),
            weights_json=weights_json,
            test_features=test_features,
            audio=dict(audio),
            batch_size=batch_size,
            device=device,
        )


def run_info(settings: dict, model: str, method: str, seed: int, fold: int, source: str) -> dict:
    """What metrics.json records of a run: its key, weights and a digest of its settings."""
    return {
        "model": model,
        "fold": int(fold),
        "seed": int(seed),
        "weights": source,
        # Settings (the rule's params) as plain values; reading them for a digest is no "use"
        "config_digest": digest(settings.plain() if hasattr(settings, "plain") else settings),
    }


def train_run(
    settings: dict,
    model: str,
    method: str,
    seed: int,
    fold: int,
    manifest_path: Path,
    folds_path: Path,
    weights_json: Path,
    out_dir: Path,
    checkpoints: Path,
    features_path: Path | None = None,
    threads: int | None = 1,
) -> None:
    """Train one ``model x method x seed x fold`` run from its rule's settings into ``out_dir``.

    ``threads=None``: run in the calling process as it is (no GPU claimed, torch's thread
    count untouched): heads on cached features, run by Snakemake in its own process.

    ``settings`` is :meth:`serlens.methods.Method.train_settings` plus ``classes``: all the
    run reads. ``checkpoints`` is kept outside the run's outputs and removed when it is done.
    """
    from serlens.methods import Method
    from serlens.train.data import read_fold_splits

    spec = Method.from_settings(method, settings)
    classes = list(settings["classes"])
    splits = read_fold_splits(manifest_path, folds_path, fold, classes)
    info = run_info(
        settings, model, method, seed, fold, json.loads(Path(weights_json).read_text())["source"]
    )
    ckpt = Path(checkpoints)
    device = "cpu" if threads is None else device_and_threads(threads)
    if spec.uses_features:
        from serlens.train.features import load_features
        from serlens.train.frozen import run_frozen

        features = {
            name: load_features(features_path, split.utt_ids) for name, split in splits.items()
        }
        with compute_time():
            run_frozen(
                features,
                splits,
                classes,
                settings["train"],
                seed,
                out_dir,
                ckpt,
                info,
                (spec.readout,),
            )
    else:
        from serlens.models.encoder import load_encoder
        from serlens.train.lora import run_encoder_method

        for split in splits.values():
            split.load()
        encoder = load_encoder(model_path(weights_json))
        config = {
            "seed": seed,
            **{k: settings[k] for k in ("train", "lora", "audio") if k in settings},
        }
        with compute_time():
            run_encoder_method(
                encoder, splits, classes, spec, config, out_dir, ckpt / "last.pt", info, device
            )
    shutil.rmtree(ckpt, ignore_errors=True)


def log_to(path: str | Path) -> None:
    """Send serlens' and Python's warnings to a job's log file (and stderr)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handlers = [logging.FileHandler(path, mode="w"), logging.StreamHandler()]
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    logging.captureWarnings(True)
    # peft 0.21 calls an attribute transformers 5 renamed; harmless, and it fires in every job.
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
    for noisy in ("transformers", "peft", "urllib3", "huggingface_hub", "numba", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
