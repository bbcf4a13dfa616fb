"""CREMA-D (Crowd-sourced Emotional Multimodal Actors Dataset; Cao et al., IEEE Trans.
Affective Computing 5(4):377-390, 2014) from its file names and rating tables.

Layout (the corpus repository's)::

    AudioWAV/AAAA_SSS_EEE_LL.wav          e.g. 1001_DFA_ANG_XX.wav
    VideoDemographics.csv                 ActorID, Age, Sex, Race, Ethnicity (optional here)
    processedResults/summaryTable.csv     crowd votes (needed only for perceived labels)

File name fields: actor ``AAAA`` (1001–1091, the speaker), sentence ``SSS`` (one of the
twelve: IEO, TIE, IOM, IWW, TAI, MTI, IWL, ITH, DFA, ITS, TSI, WSI; the recurring item),
emotion ``EEE`` and level ``LL`` (LO, MD, HI, or XX unspecified).

Labels (``corpus.cremad.labels``):

* ``"intended"`` (default): the emotion the actor was asked to portray, from the file name
  (:data:`EMOTIONS`): ANG → ``ang``, DIS → ``dis``, FEA → ``fea``, HAP → ``hap``, NEU →
  ``neu``, SAD → ``sad``;
* ``"perceived"``: the crowd's majority vote on the *voice alone* (audio-only ratings), the
  ``VoiceVote`` column of ``processedResults/summaryTable.csv`` (columns ``FileName,
  VoiceVote, VoiceLevel, FaceVote, FaceLevel, MultiModalVote, MultiModalLevel``), one letter
  of A, D, F, H, N, S (:data:`VOTES`, same mapping). A tie (letters joined by ``:``, e.g.
  ``A:F``) or an empty vote is ``xxx`` (no agreement). Every clip in AudioWAV must have a
  row in the table (a clip without one is an error, not ``xxx``: the table covers the
  whole corpus, so a missing row means a mismatched table).

Gender comes from ``VideoDemographics.csv`` (``Sex``: Male → ``M``, Female → ``F``) when the
file is there (then it must list every actor of the tree), ``"NA"`` for every actor when it
is not. ``session`` is left empty: speaker groups are assigned later. Files in AudioWAV that
are not ``.wav`` (and macOS ``._`` files) are left out and counted (:func:`skipped`).
Reading never opens the audio.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from pathlib import Path

from serlens.corpus.manifest import Candidate
from serlens.errors import ConfigError, CorpusError

log = logging.getLogger(__name__)

#: File-name emotion (intended) -> project label (Cao et al. 2014).
EMOTIONS = {
    "ANG": "ang",
    "DIS": "dis",
    "FEA": "fea",
    "HAP": "hap",
    "NEU": "neu",
    "SAD": "sad",
}
#: summaryTable.csv vote letter (perceived) -> project label.
VOTES = {"A": "ang", "D": "dis", "F": "fea", "H": "hap", "N": "neu", "S": "sad"}
NO_AGREEMENT = "xxx"
SENTENCES = {
    "IEO": "It's eleven o'clock",
    "TIE": "That is exactly what happened",
    "IOM": "I'm on my way to the meeting",
    "IWW": "I wonder what this is about",
    "TAI": "The airplane is almost full",
    "MTI": "Maybe tomorrow it will be cold",
    "IWL": "I would like a new alarm clock",
    "ITH": "I think I have a doctor's appointment",
    "DFA": "Don't forget a jacket",
    "ITS": "I think I've seen this before",
    "TSI": "The surface is slick",
    "WSI": "We'll stop in a couple of minutes",
}
LEVELS = {"LO": "low", "MD": "medium", "HI": "high", "XX": "unspecified"}
ACTORS = range(1001, 1092)
SEXES = {"Male": "M", "Female": "F"}
LABEL_SOURCES = ("intended", "perceived")

NAME = re.compile(
    r"^(?P<actor>\d{4})_(?P<sentence>[A-Z]{3})_(?P<emotion>[A-Z]{3})_(?P<level>[A-Z]{2})$"
)
EXPECTED = (
    "expected AAAA_SSS_EEE_LL.wav (actor, sentence, emotion, level), e.g. 1001_DFA_ANG_XX.wav"
)
SUMMARY_TABLE = Path("processedResults") / "summaryTable.csv"
DEMOGRAPHICS = "VideoDemographics.csv"
NOT_WAV = "not a .wav file"
RESOURCE_FORK = "macOS ._ resource file"
ROOT_HINT = "corpus.root must be the CREMA-D folder holding AudioWAV/"


def label_source(settings: dict | None) -> str:
    """``corpus.cremad.labels``: ``"intended"`` (default) or ``"perceived"``."""
    source = ((settings or {}).get("cremad") or {}).get("labels", "intended")
    if source not in LABEL_SOURCES:
        raise ConfigError(
            f"config key corpus.cremad.labels: {source!r} is not one of {list(LABEL_SOURCES)}"
        )
    return source


def parse_name(path: Path) -> dict[str, str]:
    """actor, sentence, emotion and level of one file; CorpusError naming the file otherwise."""
    path = Path(path)
    match = NAME.match(path.stem)
    if path.suffix.lower() != ".wav" or match is None:
        raise CorpusError(f"{path}: not a CREMA-D file name; {EXPECTED}")
    fields = match.groupdict()
    if int(fields["actor"]) not in ACTORS:
        raise CorpusError(
            f"{path}: actor {fields['actor']} is outside CREMA-D's 1001-1091; {EXPECTED}"
        )
    for field, allowed in [("sentence", SENTENCES), ("emotion", EMOTIONS), ("level", LEVELS)]:
        if fields[field] not in allowed:
            raise CorpusError(
                f"{path}: {field} code {fields[field]!r} is not one of CREMA-D's "
                f"{sorted(allowed)}; {EXPECTED}"
            )
    return fields


def audio_dir(root: Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"{root}: no such folder; {ROOT_HINT}")
    folder = root / "AudioWAV"
    if not folder.is_dir():
        raise CorpusError(f"{root}: no AudioWAV/ folder; {ROOT_HINT}")
    return folder


def _files(root: Path) -> tuple[list[tuple[Path, dict[str, str]]], Counter]:
    """Parsed ``.wav`` files of AudioWAV in name order, and the files left out by reason."""
    folder = audio_dir(root)
    files, left_out = [], Counter()
    for path in sorted(folder.iterdir()):
        if path.name.startswith("._"):
            left_out[RESOURCE_FORK] += 1
        elif not path.is_file() or path.suffix.lower() != ".wav":
            left_out[NOT_WAV] += 1
        else:
            files.append((path, parse_name(path)))
    if not files:
        raise CorpusError(f"{folder}: holds no .wav files; {ROOT_HINT}")
    stems = Counter(p.stem for p, _ in files)
    duplicated = sorted(s for s, n in stems.items() if n > 1)
    if duplicated:
        raise CorpusError(f"{folder}: utterance id(s) {duplicated[:5]} occur more than once.")
    return files, left_out


def _check_header(path: Path, reader: csv.DictReader, required: list[str]) -> None:
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise CorpusError(
            f"{path}:1: header lacks column(s) {', '.join(missing)}; needs {', '.join(required)}."
        )


def read_demographics(root: Path) -> dict[str, str] | None:
    """actor -> ``M``/``F`` from ``VideoDemographics.csv``; None when the file is absent."""
    path = Path(root) / DEMOGRAPHICS
    if not path.is_file():
        return None
    out: dict[str, str] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        _check_header(path, reader, ["ActorID", "Sex"])
        for number, row in enumerate(reader, start=2):
            actor = (row["ActorID"] or "").strip()
            sex = (row["Sex"] or "").strip()
            if not re.fullmatch(r"\d{4}", actor):
                raise CorpusError(f"{path}:{number}: ActorID {actor!r} is not a 4-digit actor id.")
            if sex not in SEXES:
                raise CorpusError(
                    f"{path}:{number}: Sex {sex!r} for actor {actor} is not one of {sorted(SEXES)}."
                )
            if actor in out:
                raise CorpusError(f"{path}:{number}: actor {actor} is listed twice.")
            out[actor] = SEXES[sex]
    return out


def _genders(root: Path, actors: set[str]) -> dict[str, str]:
    table = read_demographics(root)
    if table is None:
        return dict.fromkeys(sorted(actors), "NA")
    missing = sorted(actors - set(table))
    if missing:
        raise CorpusError(
            f"{Path(root) / DEMOGRAPHICS}: lacks actor(s) {missing[:5]} whose files are in "
            "AudioWAV/; use the corpus's own VideoDemographics.csv (or remove it: gender NA)."
        )
    return {a: table[a] for a in sorted(actors)}


def vote_label(vote: str, where: str) -> str:
    """A ``VoiceVote`` cell as a project label: one letter -> its code, a tie or empty ->
    ``xxx``; CorpusError naming ``where`` for an unknown letter."""
    vote = vote.strip()
    if vote in ("", "NA"):
        return NO_AGREEMENT
    letters = [v.strip() for v in vote.split(":")]
    unknown = [v for v in letters if v not in VOTES]
    if unknown:
        raise CorpusError(
            f"{where}: VoiceVote {vote!r} holds {unknown}, not one of {sorted(VOTES)} "
            "(ties are letters joined by ':')."
        )
    return VOTES[letters[0]] if len(set(letters)) == 1 else NO_AGREEMENT


def read_voice_votes(root: Path) -> dict[str, tuple[str, str]]:
    """clip stem -> (perceived label, ``"file:line"``) from ``processedResults/summaryTable.csv``."""
    path = Path(root) / SUMMARY_TABLE
    if not path.is_file():
        raise CorpusError(
            f"{path}: missing; corpus.cremad.labels 'perceived' reads the crowd's voice votes "
            "from it (the CREMA-D repository's processedResults/summaryTable.csv). Add it or "
            "set corpus.cremad.labels to 'intended'."
        )
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        # The README spells it fileName, the published table FileName.
        name_col = next((c for c in fields if c.lower() == "filename"), None)
        missing = (["FileName"] if name_col is None else []) + (
            ["VoiceVote"] if "VoiceVote" not in fields else []
        )
        if missing:
            raise CorpusError(
                f"{path}:1: header lacks column(s) {', '.join(missing)}; needs FileName, VoiceVote."
            )
        out: dict[str, tuple[str, str]] = {}
        for number, row in enumerate(reader, start=2):
            where = f"{path}:{number}"
            name = (row[name_col] or "").strip()
            stem = (
                Path(name).stem if Path(name).suffix.lower() in (".wav", ".mp3", ".flv") else name
            )
            if not NAME.match(stem):
                raise CorpusError(f"{where}: FileName {name!r} is not a CREMA-D clip; {EXPECTED}")
            if stem in out:
                raise CorpusError(f"{where}: clip {stem} is listed twice (also {out[stem][1]}).")
            out[stem] = (vote_label(row["VoiceVote"] or "", where), where)
    return out


def read(root: Path, settings: dict) -> list[Candidate]:
    """Every ``AudioWAV/*.wav``, labelled as ``corpus.cremad.labels`` says (module docstring)."""
    source = label_source(settings)
    files, left_out = _files(root)
    for reason, n in sorted(left_out.items()):
        log.info("CREMA-D %s: %d file(s) left out: %s", root, n, reason)
    genders = _genders(root, {f["actor"] for _, f in files})
    votes = read_voice_votes(root) if source == "perceived" else {}
    out = []
    for path, fields in files:
        if source == "perceived":
            if path.stem not in votes:
                raise CorpusError(
                    f"{Path(root) / SUMMARY_TABLE}: has no row for {path.name} (AudioWAV/); "
                    "corpus.cremad.labels 'perceived' needs the table of this corpus."
                )
            label, where = votes[path.stem]
        else:
            label, where = EMOTIONS[fields["emotion"]], str(path)
        out.append(
            Candidate(
                utt_id=path.stem,
                path=path,
                session="",
                speaker=fields["actor"],
                gender=genders[fields["actor"]],
                raw_label=label,
                where=where,
                item=fields["sentence"],
            )
        )
    return out


def skipped(root: Path, settings: dict) -> dict[str, int]:
    """reason -> number of files in AudioWAV/ left out (non-wav files); {} for the corpus as
    distributed."""
    return dict(sorted(_files(root)[1].items()))


def speakers(root: Path, settings: dict) -> dict[str, str]:
    """actor (``"1001"``) -> gender (M/F from VideoDemographics.csv, NA without it); names only."""
    files, _ = _files(root)
    return _genders(root, {f["actor"] for _, f in files})
