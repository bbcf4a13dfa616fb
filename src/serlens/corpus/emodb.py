"""EmoDB (Berlin Database of Emotional Speech; Burkhardt et al., Interspeech 2005) from its file names.

Layout: ``{root}/wav/SSTTTEV.wav``, e.g. ``03a01Fa.wav``: speaker ``SS`` (two digits), text
code ``TTT`` (``a01``…``b10``), emotion ``E`` (the German initial) and version ``V`` (a
letter, when a sentence was recorded more than once). The file name is the only source of
the label (the CSV shipped with some copies mislabels a few files).

Emotions map to the project's short codes: W (Ärger/Wut) → ``ang``, L (Langeweile) →
``bor``, E (Ekel) → ``dis``, A (Angst) → ``fea``, F (Freude) → ``hap``, T (Trauer) →
``sad``, N → ``neu``; ``corpus.classes`` and ``corpus.merge`` then pick the class set (the
default ``neu, hap, ang, sad`` keeps four, the other three are dropped and counted).

Each text code is a *recurring item* (the manifest's ``item`` column,
:func:`serlens.corpus.manifest.emodb_candidates`): the ten sentences are said by every actor,
in several emotions, which is what the probing control task needs.

EmoDB has no sessions. Speaker-independent folds use speaker groups balanced by gender
(:func:`serlens.corpus.folds.assign_speaker_groups`; the default five hold one male and one
female speaker each, the k-th of each in speaker order), or leave-one-speaker-out. Speakers
outside the published ten are an error (their gender is unknown).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from serlens.errors import CorpusError

EMOTIONS = {
    "W": "ang",
    "L": "bor",
    "E": "dis",
    "A": "fea",
    "F": "hap",
    "T": "sad",
    "N": "neu",
}
#: The ten actors and their gender (Burkhardt et al. 2005).
SPEAKERS = {
    "03": "M",
    "10": "M",
    "11": "M",
    "12": "M",
    "15": "M",
    "08": "F",
    "09": "F",
    "13": "F",
    "14": "F",
    "16": "F",
}
NAME = re.compile(r"^(?P<speaker>\d{2})(?P<text>[ab]\d{2})(?P<emotion>[A-Z])(?P<version>[a-z])$")


@dataclass(frozen=True)
class EmodbUtterance:
    utt_id: str
    path: Path
    speaker: str
    gender: str
    text: str  # the sentence's code: the same ten sentences recur across speakers
    raw_label: str


def parse_name(path: Path) -> EmodbUtterance:
    """One file's utterance; CorpusError naming the file and the expected form otherwise."""
    match = NAME.match(path.stem)
    if path.suffix.lower() != ".wav" or match is None:
        raise CorpusError(
            f"{path}: not an EmoDB file name; expected SSTTTEV.wav (speaker, text, emotion, "
            "version), e.g. 03a01Fa.wav"
        )
    emotion = match["emotion"]
    if emotion not in EMOTIONS:
        raise CorpusError(
            f"{path}: emotion letter {emotion!r} is not one of EmoDB's {sorted(EMOTIONS)}"
        )
    speaker = match["speaker"]
    if speaker not in SPEAKERS:
        raise CorpusError(
            f"{path}: speaker {speaker!r} is not one of EmoDB's ten actors {sorted(SPEAKERS)}"
        )
    return EmodbUtterance(
        utt_id=path.stem,
        path=path,
        speaker=speaker,
        gender=SPEAKERS[speaker],
        text=match["text"],
        raw_label=EMOTIONS[emotion],
    )


def wav_dir(root: Path) -> Path:
    folder = Path(root) / "wav"
    if not folder.is_dir():
        raise CorpusError(
            f"{root}: no wav/ folder; corpus.root must be the EmoDB folder holding wav/"
        )
    return folder


def read_emodb(root: Path) -> list[EmodbUtterance]:
    """Every ``wav/*.wav`` of an EmoDB tree, in file-name order (other files are ignored)."""
    files = sorted(p for p in wav_dir(root).iterdir() if p.suffix.lower() == ".wav")
    if not files:
        raise CorpusError(f"{wav_dir(root)}: holds no .wav files")
    return [parse_name(p) for p in files]


def read(root: Path, settings: dict) -> list:
    """The manifest candidates (registry interface): the text code is the recurring item;
    ``session`` is left for the speaker groups."""
    from serlens.corpus.manifest import Candidate

    return [
        Candidate(
            utt_id=u.utt_id,
            path=u.path,
            session="",
            speaker=u.speaker,
            gender=u.gender,
            raw_label=u.raw_label,
            where=str(u.path),
            item=u.text,
        )
        for u in read_emodb(root)
    ]


def speakers(root: Path, settings: dict) -> dict[str, str]:
    """speaker -> gender of the speakers in the tree (file names only)."""
    return {u.speaker: u.gender for u in read_emodb(root)}


def skipped(root: Path, settings: dict) -> dict[str, int]:
    """Files in ``wav/`` that are not wav files (left out, counted)."""
    others = [p for p in wav_dir(root).iterdir() if p.is_file() and p.suffix.lower() != ".wav"]
    return {"not a .wav file": len(others)} if others else {}
