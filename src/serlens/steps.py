"""The workflow's steps as functions of a validated config and paths.

The Snakemake scripts and the ``serlens`` command both call these, so a step run by hand
does exactly what the workflow does.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import warnings
from pathlib import Path

import pandas as pd
import torch

from serlens.config import digest
from serlens.corpus.folds import leave_one_session_out
from serlens.corpus.manifest import (
    build_manifest,
    iemocap_candidates,
    read_manifest,
    user_manifest_candidates,
)
from serlens.errors import ConfigError
from serlens.io import write_tsv_atomic

log = logging.getLogger("serlens")


def synthetic_root(config: dict) -> Path:
    return Path(config["resources_dir"]) / "corpus" / "synthetic"


def corpus_root(config: dict) -> Path:
    """The folder (or TSV) the manifest is read from."""
    if config["corpus"]["kind"] == "synthetic":
        return synthetic_root(config)
    return Path(config["corpus"]["root"])


def synth_corpus(root: Path, utterances_per_speaker: int, seed: int) -> Path:
    """Generate the synthetic corpus at ``root``, replacing an older one."""
    from serlens.corpus.synth import write_synthetic_corpus

    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    return write_synthetic_corpus(root, utterances_per_speaker=utterances_per_speaker, seed=seed)


def make_manifest(config: dict, root: Path, manifest_out: Path, summary_out: Path) -> pd.DataFrame:
    """Read the corpus, map labels, check audio; write the manifest and the label summary."""
    corpus = config["corpus"]
    if corpus["kind"] == "manifest":
        candidates = user_manifest_candidates(Path(root))
    else:
        candidates = iemocap_candidates(Path(root))
    manifest, summary = build_manifest(
        candidates, corpus["classes"], corpus["merge"], corpus["on_bad_audio"]
    )
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


def make_folds(config: dict, manifest_path: Path, folds_out: Path) -> pd.DataFrame:
    folds = leave_one_session_out(read_manifest(manifest_path), config["folds"]["dev"])
    write_tsv_atomic(folds, folds_out)
    return folds


def resolve_model(config: dict, model: str, out_json: Path) -> Path:
    """Resolve ``config['models'][model]`` to a model folder and record it in ``out_json``."""
    from serlens.models.resolve import resolve_weights

    if model not in config["models"]:
        raise ConfigError(
            f"config key models: no model {model!r}; allowed: {sorted(config['models'])}"
        )
    source = config["models"][model]
    path = resolve_weights(source, Path(config["resources_dir"]))
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
    config: dict, weights_json: Path, manifest_path: Path, out_path: Path, threads: int = 1
) -> None:
    from serlens.models.encoder import load_encoder
    from serlens.train.features import cache_features

    device = device_and_threads(threads)
    encoder = load_encoder(model_path(weights_json)).to(device)
    cache_features(
        encoder,
        read_manifest(manifest_path),
        out_path,
        config["audio"]["input_policy"],
        config["audio"]["max_seconds"],
        config["train"]["feature_batch_size"],
        device,
    )


def run_info(config: dict, model: str, method: str, fold: int) -> dict:
    return {
        "model": model,
        "fold": int(fold),
        "weights": config["models"][model],
        "input_policy": config["audio"]["input_policy"],
        "seed": config["seed"],
        "config_digest": digest(
            {k: config[k] for k in ("corpus", "audio", "folds", "train", "lora", "seed")}
        ),
    }


def parse_method(method: str) -> int | None:
    """``frozen`` -> None, ``lora_r8`` -> 8."""
    if method == "frozen":
        return None
    match = re.fullmatch(r"lora_r(\d+)", method)
    if match is None:
        raise ConfigError(f"method {method!r}: expected 'frozen' or 'lora_r<rank>'.")
    return int(match[1])


def checkpoint_dir(config: dict, model: str, method: str, fold: int) -> Path:
    """Epoch checkpoints live outside the run's outputs, so a failed job's cleanup keeps them."""
    return Path(config["results"]) / "checkpoints" / model / method / f"fold{fold}"


def train_run(
    config: dict,
    model: str,
    method: str,
    fold: int,
    manifest_path: Path,
    folds_path: Path,
    weights_json: Path,
    out_dir: Path,
    features_path: Path | None = None,
    threads: int = 1,
) -> None:
    """Train one ``model x method x fold`` run and write its files into ``out_dir``."""
    from serlens.train.data import read_fold_splits

    classes = config["corpus"]["classes"]
    splits = read_fold_splits(manifest_path, folds_path, fold, classes)
    info = run_info(config, model, method, fold)
    ckpt = checkpoint_dir(config, model, method, fold)
    rank = parse_method(method)
    device = device_and_threads(threads)
    if rank is None:
        from serlens.train.features import load_features
        from serlens.train.frozen import run_frozen

        features = {
            name: load_features(features_path, split.utt_ids) for name, split in splits.items()
        }
        run_frozen(features, splits, classes, config["train"], config["seed"], out_dir, ckpt, info)
    else:
        from serlens.models.encoder import load_encoder
        from serlens.train.lora import run_lora

        for split in splits.values():
            split.load()
        encoder = load_encoder(model_path(weights_json))
        run_lora(encoder, splits, classes, rank, config, out_dir, ckpt / "last.pt", info, device)
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
