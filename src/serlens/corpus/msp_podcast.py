"""MSP-Podcast (Lotfian & Busso, IEEE Trans. Affective Computing 10(4):471-483, 2019) from
its consensus label table.

Layout (the release's)::

    Labels/labels_consensus.csv     FileName, EmoClass, EmoAct, EmoVal, EmoDom, SpkrID,
                                    Gender, Split_Set (one row per segment)
    Audios/{FileName}               e.g. Audios/MSP-PODCAST_0001_0008.wav

``EmoClass`` is the consensus primary emotion, mapped to the project's codes
(:data:`EMOTIONS`): N neutral → ``neu``, H happy → ``hap``, A angry → ``ang``, S sad →
``sad``, F fear → ``fea``, D disgust → ``dis``, U surprise → ``sur``, C contempt → ``con``,
O other → ``oth``, X no agreement → ``xxx``. The dimensional columns are not read.

Splits: the corpus's own partition is kept (``Candidate.split``), speaker-independent by
construction: ``Split_Set`` Train → ``"train"``, Development → ``"dev"``, Test1 → ``"test"``.
Test2 (a second test set, drawn from other podcasts by a different selection) and Test3
(the challenge test set, whose labels are withheld) are *left out and counted*
(:func:`skipped`): the workflow scores one test set, Test1, and results on Test2/Test3 are
not comparable with it. Any other ``Split_Set`` value is an error.

Speakers: ``SpkrID`` as written (e.g. ``"127"``); the many segments whose speaker is
``Unknown`` get one speaker each, ``unknown:{utt_id}``, so none is grouped with another
(each is its own cluster when resampling by speaker). ``Gender`` Male → ``M``, Female →
``F``, anything else → ``NA``; a speaker whose rows disagree (Male on some, Female on
others) gets ``NA`` throughout, with a warning. MSP-Podcast has no recurring sentences
(``item = ""``) and no sessions (``session = ""``). Reading never opens the audio.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from pathlib import Path

from serlens.corpus.manifest import Candidate
from serlens.errors import CorpusError

log = logging.getLogger(__name__)

#: EmoClass code -> project label (Lotfian & Busso 2019; the release's documentation).
EMOTIONS = {
    "N": "neu",
    "H": "hap",
    "A": "ang",
    "S": "sad",
    "F": "fea",
    "D": "dis",
    "U": "sur",
    "C": "con",
    "O": "oth",
    "X": "xxx",
}
#: Split_Set -> Candidate.split for the splits read.
SPLITS = {"Train": "train", "Development": "dev", "Test1": "test"}
#: Split_Set values of the release that are left out and counted (module docstring).
OTHER_SPLITS = ("Test2", "Test3")
GENDERS = {"Male": "M", "Female": "F"}
UNKNOWN_SPEAKER = "Unknown"
REQUIRED_COLUMNS = ["FileName", "EmoClass", "SpkrID", "Gender", "Split_Set"]
LABELS = Path("Labels") / "labels_consensus.csv"
NAME = re.compile(r"^MSP-PODCAST_\d+(?:_\d+){1,2}\.wav$")
EXPECTED = "expected MSP-PODCAST_NNNN_NNNN.wav, e.g. MSP-PODCAST_0001_0008.wav"
ROOT_HINT = (
    "corpus.root must be the MSP-Podcast folder holding Labels/labels_consensus.csv and Audios/"
)


def skip_reason(split: str) -> str:
    return f"split {split} (only Train, Development and Test1 are read)"


def labels_file(root: Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"{root}: no such folder; {ROOT_HINT}")
    path = root / LABELS
    if not path.is_file():
        raise CorpusError(f"{path}: missing; {ROOT_HINT}")
    return path


def _scan(root: Path) -> tuple[list[Candidate], Counter]:
    root = Path(root)
    path = labels_file(root)
    rows: list[dict] = []
    left_out: Counter = Counter()
    seen: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise CorpusError(
                f"{path}:1: header lacks column(s) {', '.join(missing)}; needs "
                f"{', '.join(REQUIRED_COLUMNS)} (comma-separated)."
            )
        for number, row in enumerate(reader, start=2):
            where = f"{path}:{number}"
            name = (row["FileName"] or "").strip()
            if not NAME.match(name):
                raise CorpusError(
                    f"{where}: FileName {name!r} is not an MSP-Podcast file; {EXPECTED}"
                )
            if name in seen:
                raise CorpusError(f"{where}: {name} is listed twice (first at line {seen[name]}).")
            seen[name] = number
            split = (row["Split_Set"] or "").strip()
            if split in OTHER_SPLITS:
                left_out[skip_reason(split)] += 1
                continue
            if split not in SPLITS:
                raise CorpusError(
                    f"{where}: Split_Set {split!r} is not one of "
                    f"{list(SPLITS) + list(OTHER_SPLITS)}."
                )
            emo = (row["EmoClass"] or "").strip()
            if emo not in EMOTIONS:
                raise CorpusError(
                    f"{where}: EmoClass {emo!r} is not one of MSP-Podcast's {sorted(EMOTIONS)}."
                )
            utt_id = Path(name).stem
            speaker = (row["SpkrID"] or "").strip()
            if not speaker:
                raise CorpusError(f"{where}: empty SpkrID (the release writes 'Unknown').")
            if speaker == UNKNOWN_SPEAKER:
                speaker = f"unknown:{utt_id}"
            rows.append(
                {
                    "utt_id": utt_id,
                    "path": root / "Audios" / name,
                    "speaker": speaker,
                    "gender": GENDERS.get((row["Gender"] or "").strip(), "NA"),
                    "raw_label": EMOTIONS[emo],
                    "where": where,
                    "split": SPLITS[split],
                }
            )
    if not rows:
        raise CorpusError(
            f"{path}: no Train, Development or Test1 rows"
            + (f" (left out: {dict(left_out)})" if left_out else "")
            + "."
        )
    genders = _speaker_genders(rows, path)
    candidates = [
        Candidate(
            utt_id=r["utt_id"],
            path=r["path"],
            session="",
            speaker=r["speaker"],
            gender=genders[r["speaker"]],
            raw_label=r["raw_label"],
            where=r["where"],
            item="",
            split=r["split"],
        )
        for r in rows
    ]
    return candidates, left_out


def _speaker_genders(rows: list[dict], path: Path) -> dict[str, str]:
    """One gender per speaker: the one its rows give, NA when they give none or disagree."""
    given: dict[str, set[str]] = {}
    for r in rows:
        given.setdefault(r["speaker"], set())
        if r["gender"] != "NA":
            given[r["speaker"]].add(r["gender"])
    out = {}
    for speaker, values in given.items():
        if len(values) > 1:
            log.warning("%s: speaker %s has rows of both genders; gender set to NA.", path, speaker)
        out[speaker] = values.pop() if len(values) == 1 else "NA"
    return out


def read(root: Path, settings: dict) -> list[Candidate]:
    """The Train, Development and Test1 segments of ``Labels/labels_consensus.csv``, in file
    order, each with its split (module docstring); other splits are logged and counted."""
    audios = Path(root) / "Audios"
    candidates, left_out = _scan(root)
    if not audios.is_dir():
        raise CorpusError(f"{audios}: missing; {ROOT_HINT}")
    for reason, n in sorted(left_out.items()):
        log.info("MSP-Podcast %s: %d segment(s) left out: %s", root, n, reason)
    return candidates


def skipped(root: Path, settings: dict) -> dict[str, int]:
    """reason -> number of segments left out by design (Test2/Test3 rows)."""
    return dict(sorted(_scan(root)[1].items()))


def speakers(root: Path, settings: dict) -> dict[str, str]:
    """speaker -> gender of the segments read (``unknown:{utt_id}`` for unknown speakers);
    from the label table only."""
    return {c.speaker: c.gender for c in _scan(root)[0]}
