"""What a training run reads: the manifest's audio for one fold, label indices, outputs written atomically."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from serlens.audio import load_audio
from serlens.corpus.folds import fold_split
from serlens.errors import CorpusError
from serlens.io import write_json_atomic, write_tsv_atomic  # noqa: F401  (re-exported)
from serlens.metrics import summarise


@dataclass
class Split:
    """Utterances of one split: ids, label indices, durations, and (when loaded) waveforms."""

    utt_ids: list[str]
    labels: np.ndarray
    durations: np.ndarray
    paths: list[str]
    waves: list[np.ndarray] | None = None

    def load(self) -> Split:
        self.waves = [load_audio(p) for p in self.paths]
        return self

    def __len__(self) -> int:
        return len(self.utt_ids)


def label_indices(labels, classes: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise CorpusError(
            f"labels {unknown} are not in corpus.classes {classes}; rebuild the manifest."
        )
    return np.array([index[x] for x in labels], dtype=np.int64)


def manifest_split(manifest: pd.DataFrame, utt_ids: list[str], classes: list[str]) -> Split:
    """The manifest's utterances ``utt_ids``, in that order, as a :class:`Split`."""
    rows = manifest.set_index("utt_id").loc[utt_ids]
    return Split(
        utt_ids=list(utt_ids),
        labels=label_indices(rows["label"], classes),
        durations=rows["duration_s"].to_numpy(dtype=np.float64),
        paths=rows["path"].tolist(),
    )


def fold_splits(
    manifest: pd.DataFrame, folds: pd.DataFrame, fold: int, classes: list[str]
) -> dict[str, Split]:
    """train/dev/test of one fold, each in manifest order."""
    return {
        split: manifest_split(manifest, fold_split(folds, fold, split), classes)
        for split in ("train", "dev", "test")
    }


def read_fold_splits(
    manifest_path: Path, folds_path: Path, fold: int, classes: list[str]
) -> dict[str, Split]:
    """train/dev/test of one fold, read from ``manifest.tsv`` and ``folds.tsv``."""
    from serlens.corpus.manifest import read_manifest

    folds = pd.read_csv(folds_path, sep="\t", dtype={"utt_id": str})
    return fold_splits(read_manifest(manifest_path), folds, fold, classes)


def predictions_frame(
    utt_ids: list[str], labels: np.ndarray, probs: np.ndarray, classes: list[str]
) -> pd.DataFrame:
    """``utt_id, label, pred, p_<class>...``: the contract every metric is derived from."""
    frame = pd.DataFrame(
        {
            "utt_id": utt_ids,
            "label": [classes[i] for i in labels],
            "pred": [classes[i] for i in probs.argmax(axis=1)],
        }
    )
    for k, name in enumerate(classes):
        frame[f"p_{name}"] = np.round(probs[:, k], 6)
    return frame


class EpochPredictions:
    """The test split's predicted class after every epoch, recorded and never read by
    training: model selection stays on dev, and the paper's test-fold selection (its code
    keeps the checkpoint with the best test accuracy) can be read off afterwards
    (:mod:`serlens.report.protocol`).

    Each epoch's predictions go to ``directory/epoch{e}.tsv`` as they are made (beside the
    checkpoint, so a resumed run still has the epochs before it stopped); :meth:`frame` joins
    the epochs of a finished run into the run's ``test_epochs.tsv``:
    ``epoch, utt_id, label, pred``.
    """

    def __init__(self, directory: Path, split: Split, classes: list[str]):
        self.directory, self.split, self.classes = Path(directory), split, list(classes)

    def record(self, epoch: int, probs: np.ndarray) -> None:
        frame = pd.DataFrame(
            {
                "epoch": int(epoch),
                "utt_id": self.split.utt_ids,
                "label": [self.classes[i] for i in self.split.labels],
                "pred": [self.classes[i] for i in np.asarray(probs).argmax(axis=1)],
            }
        )
        write_tsv_atomic(frame, self.directory / f"epoch{epoch}.tsv")

    def frame(self, epochs) -> pd.DataFrame:
        """Every recorded epoch of ``epochs`` (the run's history), in order; an epoch without
        its file is an error (a checkpoint from before the recorder: rerun the job)."""
        parts = []
        for epoch in epochs:
            path = self.directory / f"epoch{int(epoch)}.tsv"
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path}: the test predictions of epoch {epoch} were not recorded (the "
                    "run resumed from a checkpoint written before they were); delete the "
                    "checkpoint folder and rerun the job"
                )
            parts.append(pd.read_csv(path, sep="\t", dtype={"utt_id": str}))
        return pd.concat(parts, ignore_index=True)


def metrics_from_predictions(predictions: pd.DataFrame, classes: list[str]) -> dict:
    """UAR, WAR, macro-F1 and confusion recomputed from a predictions table."""
    return summarise(
        label_indices(predictions["label"], classes),
        label_indices(predictions["pred"], classes),
        classes,
    )


def library_versions() -> dict:
    import peft
    import torch
    import transformers

    import serlens

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "numpy": np.__version__,
        "serlens": serlens.__version__,
    }
