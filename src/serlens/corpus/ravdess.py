"""RAVDESS (Ryerson Audio-Visual Database of Emotional Speech and Song; Livingstone & Russo,
PLoS ONE 13(5): e0196391, 2018) from its file names.

Layout: ``{root}/Actor_XX/MM-VV-EE-II-SS-RR-AA.wav`` (the unzipped
``Audio_Speech_Actors_01-24.zip``, optionally with the song release's folders merged in),
e.g. ``03-01-06-01-02-01-12.wav``. The seven two-digit fields, as the corpus documents them:

* ``MM`` modality: 01 full-AV, 02 video-only, 03 audio-only. The ``.wav`` files are the
  audio-only release, so a ``.wav`` named with another modality is an error (audio taken from
  the videos would repeat the same performances under other ids);
* ``VV`` vocal channel: 01 speech, 02 song. Song files are left out *and counted*
  (:func:`skipped`), the study is of speech;
* ``EE`` emotion, mapped to the project's codes (:data:`EMOTIONS`): 01 neutral → ``neu``,
  02 calm → ``cal``, 03 happy → ``hap``, 04 sad → ``sad``, 05 angry → ``ang``, 06 fearful →
  ``fea``, 07 disgust → ``dis``, 08 surprised → ``sur``;
* ``II`` intensity: 01 normal, 02 strong (neutral has no strong take in the corpus);
* ``SS`` statement: 01 "Kids are talking by the door", 02 "Dogs are sitting by the door".
  The statement code is the utterance's recurring item (the manifest's ``item`` column);
* ``RR`` repetition: 01 or 02;
* ``AA`` actor 01–24; odd-numbered actors are male, even-numbered female. The actor is the
  speaker (``"12"``) and must match the ``Actor_XX`` folder the file is in.

Files in an actor folder that are not ``.wav`` (e.g. the ``.mp4`` videos) and macOS ``._``
resource files are left out and counted. ``session`` is left empty: speaker groups are
assigned later from speaker and gender. Reading never opens the audio.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

from serlens.corpus.manifest import Candidate
from serlens.errors import CorpusError

log = logging.getLogger(__name__)

#: RAVDESS emotion code -> project label (Livingstone & Russo 2018).
EMOTIONS = {
    "01": "neu",
    "02": "cal",
    "03": "hap",
    "04": "sad",
    "05": "ang",
    "06": "fea",
    "07": "dis",
    "08": "sur",
}
MODALITIES = {"01": "full-AV", "02": "video-only", "03": "audio-only"}
VOCAL_CHANNELS = {"01": "speech", "02": "song"}
INTENSITIES = {"01": "normal", "02": "strong"}
STATEMENTS = {"01": "Kids are talking by the door", "02": "Dogs are sitting by the door"}
REPETITIONS = {"01": "1st", "02": "2nd"}
ACTORS = [f"{n:02d}" for n in range(1, 25)]

NAME = re.compile(
    r"^(?P<modality>\d\d)-(?P<channel>\d\d)-(?P<emotion>\d\d)-(?P<intensity>\d\d)-"
    r"(?P<statement>\d\d)-(?P<repetition>\d\d)-(?P<actor>\d\d)$"
)
ACTOR_DIR = re.compile(r"^Actor_(?P<actor>\d\d)$")
EXPECTED = (
    "expected MM-VV-EE-II-SS-RR-AA.wav (modality, vocal channel, emotion, intensity, "
    "statement, repetition, actor), e.g. 03-01-06-01-02-01-12.wav"
)
SONG = "song (vocal channel 02)"
NOT_WAV = "not a .wav file (e.g. video)"
RESOURCE_FORK = "macOS ._ resource file"


def gender(actor: str) -> str:
    """``"M"`` for odd-numbered actors, ``"F"`` for even (the corpus's convention)."""
    return "M" if int(actor) % 2 == 1 else "F"


def parse_name(path: Path, folder_actor: str | None = None) -> dict[str, str]:
    """The seven fields of one file name; CorpusError naming the file and the expected form.

    ``folder_actor``: the ``XX`` of the ``Actor_XX`` folder the file is in, which the name's
    actor must equal.
    """
    path = Path(path)
    match = NAME.match(path.stem)
    if path.suffix.lower() != ".wav" or match is None:
        raise CorpusError(f"{path}: not a RAVDESS file name; {EXPECTED}")
    fields = match.groupdict()
    checks = [
        ("modality", MODALITIES),
        ("channel", VOCAL_CHANNELS),
        ("emotion", EMOTIONS),
        ("intensity", INTENSITIES),
        ("statement", STATEMENTS),
        ("repetition", REPETITIONS),
        ("actor", ACTORS),
    ]
    for field, allowed in checks:
        if fields[field] not in allowed:
            raise CorpusError(
                f"{path}: {field} code {fields[field]!r} is not one of RAVDESS's "
                f"{sorted(allowed)}; {EXPECTED}"
            )
    if fields["modality"] != "03":
        raise CorpusError(
            f"{path}: modality {fields['modality']} ({MODALITIES[fields['modality']]}) in a "
            ".wav file; RAVDESS audio files are audio-only, modality 03, e.g. "
            "03-01-06-01-02-01-12.wav"
        )
    if folder_actor is not None and fields["actor"] != folder_actor:
        raise CorpusError(
            f"{path}: the name says actor {fields['actor']} but the file is in folder "
            f"Actor_{folder_actor}; each actor's files belong in their own Actor_XX folder."
        )
    return fields


def actor_dirs(root: Path) -> list[tuple[Path, str]]:
    """``(folder, XX)`` for every ``Actor_XX`` folder of the root, in order."""
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(
            f"{root}: no such folder; corpus.root must be the RAVDESS folder holding "
            "Actor_01 … Actor_24 (the unzipped Audio_Speech_Actors_01-24.zip)."
        )
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("Actor_")):
        match = ACTOR_DIR.match(folder.name)
        if match is None or match["actor"] not in ACTORS:
            raise CorpusError(
                f"{folder}: not a RAVDESS actor folder; expected Actor_XX with XX 01-24, "
                "e.g. Actor_01"
            )
        out.append((folder, match["actor"]))
    if not out:
        raise CorpusError(
            f"{root}: no Actor_XX folders; corpus.root must be the RAVDESS folder holding "
            "Actor_01 … Actor_24 (the unzipped Audio_Speech_Actors_01-24.zip)."
        )
    return out


def _scan(root: Path) -> tuple[list[Candidate], Counter]:
    candidates: list[Candidate] = []
    left_out: Counter = Counter()
    seen: dict[str, Path] = {}
    for folder, actor in actor_dirs(root):
        for path in sorted(folder.iterdir()):
            if path.name.startswith("._"):
                left_out[RESOURCE_FORK] += 1
                continue
            if not path.is_file() or path.suffix.lower() != ".wav":
                left_out[NOT_WAV] += 1
                continue
            fields = parse_name(path, actor)
            if fields["channel"] == "02":
                left_out[SONG] += 1
                continue
            if path.stem in seen:
                raise CorpusError(
                    f"{path}: utterance {path.stem} occurs twice (also {seen[path.stem]})."
                )
            seen[path.stem] = path
            candidates.append(
                Candidate(
                    utt_id=path.stem,
                    path=path,
                    session="",
                    speaker=actor,
                    gender=gender(actor),
                    raw_label=EMOTIONS[fields["emotion"]],
                    where=str(path),
                    item=fields["statement"],
                )
            )
    if not candidates:
        raise CorpusError(
            f"{root}: no speech files (MM-01-EE-II-SS-RR-AA.wav) in any Actor_XX folder"
            + (f" (left out: {dict(left_out)})" if left_out else "")
            + "; corpus.root must hold the speech release, Audio_Speech_Actors_01-24."
        )
    return candidates, left_out


def read(root: Path, settings: dict) -> list[Candidate]:
    """Every speech ``.wav`` of the tree, in folder and file-name order (module docstring);
    song and non-wav files are left out, logged and counted (:func:`skipped`)."""
    candidates, left_out = _scan(root)
    for reason, n in sorted(left_out.items()):
        log.info("RAVDESS %s: %d file(s) left out: %s", root, n, reason)
    return candidates


def skipped(root: Path, settings: dict) -> dict[str, int]:
    """reason -> number of files left out by design (song files, non-wav files)."""
    return dict(sorted(_scan(root)[1].items()))


def speakers(root: Path, settings: dict) -> dict[str, str]:
    """speaker (``"01"`` … ``"24"``) -> gender of every actor with speech files; names only."""
    return {c.speaker: c.gender for c in _scan(root)[0]}
