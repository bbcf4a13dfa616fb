"""Turn a corpus into ``manifest.tsv`` (one row per usable utterance) and a label summary.

Contract (docs/architecture.md): ``utt_id, path, session, speaker, gender, label, duration_s,
item``, labels already mapped to the class set. Utterances whose label is outside the class set
and the merge map are dropped *and counted* in the summary, never silently.

``item`` is the utterance's *recurring item*: the identity of its sentence or text where the
corpus has one that several speakers say, ``""`` where it has none. EmoDB: the text code
(``a01`` … ``b10`` of ``SSTTTEV.wav``, ten texts said by every actor; :mod:`serlens.corpus.emodb`); IEMOCAP (and the
synthetic corpus, written in its layout): a scripted utterance's script line, an improvised
one none (:mod:`serlens.corpus.iemocap`); a user manifest: its optional ``item`` column. The
probing control task (:mod:`serlens.analysis.probing`) gives every item a fixed random label.
:func:`read_manifest` reads manifests written before the column existed as having no item.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from serlens.corpus.iemocap import read_iemocap
from serlens.errors import CorpusError

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "utt_id",
    "path",
    "session",
    "speaker",
    "gender",
    "label",
    "duration_s",
    "item",
    "split",
]
#: Columns a manifest must have; ``item`` and ``split`` may be absent (no recurring item,
#: no split of the corpus's own).
REQUIRED_COLUMNS = MANIFEST_COLUMNS[:-2]
USER_MANIFEST_COLUMNS = ["path", "label", "speaker", "session"]
SAMPLE_RATE = 16000
# Peak amplitude below which a file is treated as silent (about -80 dBFS).
SILENCE_PEAK = 1e-4


@dataclass(frozen=True)
class Candidate:
    """An utterance with a label, before its audio is checked."""

    utt_id: str
    path: Path
    session: str
    speaker: str
    gender: str
    raw_label: str
    where: str  # "file:line" the label came from, for error messages
    item: str = ""  # recurring sentence/text identity (module docstring); "" = none
    split: str = ""  # the corpus's own split (train/dev/test) where it has one (MSP-Podcast)


def map_label(raw: str, classes: list[str], merge: dict[str, str]) -> str | None:
    """The class ``raw`` belongs to, or None when it is outside the class set and the merge map."""
    if raw in classes:
        return raw
    merged = merge.get(raw)
    return merged if merged in classes else None


def check_audio(path: Path, where: str) -> tuple[float, int]:
    """Duration in seconds (leading and trailing digital silence not counted) and sample rate
    of a usable wav; CorpusError naming both places otherwise."""
    import soundfile as sf

    if not path.is_file():
        raise CorpusError(f"{path}: missing audio for the utterance labelled at {where}.")
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for broken files
        raise CorpusError(f"{path}: unreadable audio ({exc}); labelled at {where}.") from exc
    if data.shape[0] == 0:
        raise CorpusError(f"{path}: empty audio file; labelled at {where}.")
    if float(np.abs(data).max()) < SILENCE_PEAK:
        raise CorpusError(f"{path}: silent audio (peak < {SILENCE_PEAK}); labelled at {where}.")
    from serlens.audio import digital_silence

    start, stop = digital_silence(data)  # zero padding is not audio (serlens.audio)
    return (stop - start) / rate, rate


def iemocap_candidates(root: Path) -> list[Candidate]:
    return [
        Candidate(
            utt_id=u.utt_id,
            path=u.wav_path,
            session=str(u.session),
            speaker=u.speaker,
            gender=u.gender,
            raw_label=u.raw_label,
            where=f"{u.source}:{u.line}",
            item=u.item,
        )
        for u in read_iemocap(root)
    ]


def user_manifest_candidates(tsv: Path) -> list[Candidate]:
    """Rows of a user TSV with columns ``path, label, speaker, session`` (optional ``utt_id,
    gender, item``; an empty or absent ``item`` = no recurring item).

    Relative paths are taken relative to the TSV's folder.
    """
    tsv = Path(tsv)
    if not tsv.is_file():
        raise CorpusError(
            f"{tsv}: corpus.root of kind 'manifest' must be a TSV file; it does not exist."
        )
    with tsv.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = [c for c in USER_MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise CorpusError(
                f"{tsv}:1: header lacks column(s) {', '.join(missing)}; "
                f"needs {', '.join(USER_MANIFEST_COLUMNS)} (tab-separated)."
            )
        out = []
        for number, row in enumerate(reader, start=2):
            empty = [c for c in USER_MANIFEST_COLUMNS if not (row.get(c) or "").strip()]
            if empty:
                raise CorpusError(f"{tsv}:{number}: empty value in column(s) {', '.join(empty)}.")
            path = Path(row["path"])
            if not path.is_absolute():
                path = tsv.parent / path
            out.append(
                Candidate(
                    utt_id=(row.get("utt_id") or path.stem).strip(),
                    path=path,
                    session=row["session"].strip(),
                    speaker=row["speaker"].strip(),
                    gender=(row.get("gender") or "").strip() or "NA",
                    raw_label=row["label"].strip(),
                    where=f"{tsv}:{number}",
                    item=(row.get("item") or "").strip(),
                )
            )
    duplicated = [u for u, n in Counter(c.utt_id for c in out).items() if n > 1]
    if duplicated:
        raise CorpusError(f"{tsv}: utterance id(s) {duplicated[:5]} occur more than once.")
    return out


def build_manifest(
    candidates: list[Candidate],
    classes: list[str],
    merge: dict[str, str],
    on_bad_audio: str = "error",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The manifest and a summary of every raw label: how many were kept (and as what) or dropped.

    ``on_bad_audio``: "error" stops at the first missing/unreadable/empty/silent file; "drop"
    leaves such utterances out and counts them in the summary under ``bad_audio``.
    """
    rows, summary, rates = [], Counter(), Counter()
    example = {}
    for cand in candidates:
        label = map_label(cand.raw_label, classes, merge)
        if label is None:
            summary[(cand.raw_label, "", "dropped: label outside classes and merge map")] += 1
            continue
        try:
            duration, rate = check_audio(cand.path, cand.where)
            rates[rate] += 1
            example.setdefault(rate, cand.path)
        except CorpusError as exc:
            if on_bad_audio == "error":
                raise
            log.warning("dropped: %s", exc)
            summary[(cand.raw_label, label, "dropped: bad audio")] += 1
            continue
        summary[(cand.raw_label, label, "kept")] += 1
        rows.append(
            [
                cand.utt_id,
                str(cand.path),
                cand.session,
                cand.speaker,
                cand.gender,
                label,
                round(duration, 4),
                cand.item,
                cand.split,
            ]
        )
    for rate, n in sorted(rates.items()):
        if rate != SAMPLE_RATE:  # one line per rate, not one per file
            log.warning(
                "%d file(s) at %d Hz (e.g. %s): resampled to %d Hz on load.",
                n,
                rate,
                example[rate],
                SAMPLE_RATE,
            )
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    if manifest.empty:
        raise CorpusError(
            "no usable utterances: every label was outside corpus.classes/corpus.merge."
        )
    absent = [c for c in classes if c not in set(manifest["label"])]
    if absent:
        raise CorpusError(
            f"corpus.classes {absent} have no utterances in this corpus; remove them or fix the labels."
        )
    summary_df = pd.DataFrame(
        [(raw, lab, status, n) for (raw, lab, status), n in sorted(summary.items())],
        columns=["raw_label", "label", "status", "n"],
    )
    return manifest, summary_df


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest written by :func:`build_manifest` with its column types.

    ``item`` and ``split`` are read as text, verbatim (a transcript "null" stays "null"; empty =
    none); a manifest without the column (written before it existed) gets ``""`` throughout.
    """
    df = pd.read_csv(path, sep="\t", dtype={"session": str, "utt_id": str, "speaker": str})
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise CorpusError(
            f"{path}: not a serlens manifest (missing {missing}); rerun the manifest rule."
        )
    for column in ("item", "split"):
        if column in df.columns:
            text = pd.read_csv(path, sep="\t", usecols=[column], dtype=str, keep_default_na=False)
            df[column] = text[column].str.strip().to_numpy()
        else:
            df[column] = ""
    return df


def speakers_from_manifest(manifest_path: Path) -> dict[str, str]:
    """utt_id -> speaker, from the manifest's ``speaker`` column (light: no model or sklearn
    import, so an encoder pass can read its speakers cheaply)."""
    manifest = read_manifest(manifest_path)
    return dict(zip(manifest["utt_id"], manifest["speaker"].astype(str), strict=True))
