"""Read an IEMOCAP_full_release tree as distributed (and the synthetic corpus, which copies its layout).

Layout read::

    Session{n}/dialog/EmoEvaluation/<dialog>.txt        consensus labels (only this level)
    Session{n}/sentences/wav/<dialog>/<utt_id>.wav      one file per utterance

A consensus line looks like ``[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]``.
The speaker of an utterance is its session plus the gender letter of the utterance id's *last*
segment (``Ses01F_impro01_M003`` is spoken by Ses01M), not the dialog prefix, which names who
wore the motion-capture markers.

Recurring items (the ``item`` column of the manifest)
----------------------------------------------------
IEMOCAP's scripted dialogs (``SesNNX_scriptNN_P``) perform the same three scripts in every
session, so their lines recur across speakers and sessions; improvised dialogs do not. A
scripted utterance's *item* is its script line's identity, used by the probing control task
(:mod:`serlens.analysis.probing`):

* where the dialog's transcription is in the tree
  (``Session{n}/dialog/transcriptions/<dialog>.txt``, lines
  ``Ses01F_script01_1_F000 [006.2901-008.2357]: What's he going to say?``), the item is the
  normalised transcript (:func:`normalise_text`: non-speech marks such as ``[LAUGHTER]``
  dropped, lower case, punctuation removed, whitespace collapsed). This is the robust choice:
  the same line is recognised whichever turn number it got in a performance (actors skip or
  split lines, so turn numbers drift between sessions), and the synthetic corpus writes its
  sentences there too, so the reader recovers them from the files themselves;
* without a transcription (file or line missing), the item falls back to the script part
  and turn, ``script01_1/F000``: the same role's k-th turn of the same script part, which
  matches across sessions only as far as the turn numbering does;
* an improvised utterance, or a scripted one whose transcript is empty after normalisation,
  has no item (``""``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from serlens.errors import CorpusError

CONSENSUS_LINE = re.compile(
    r"^\[(?P<start>\d+(?:\.\d+)?) - (?P<end>\d+(?:\.\d+)?)\]\t"
    r"(?P<utt>Ses(?P<session>\d\d)[FM]_\S+_(?P<gender>[FM])\d+)\t"
    r"(?P<label>[a-z]{3})\t"
    r"\[(?P<vad>[^\]]*)\]\s*$"
)
#: A transcription line: ``<utt_id> [start-end]: text`` (other lines, e.g. unlabelled turns
#: without times, are skipped).
TRANSCRIPTION_LINE = re.compile(r"^(?P<utt>\S+) \[[^\]]*\]:\s?(?P<text>.*?)\s*$")
_NON_SPEECH = re.compile(r"\[[^\]]*\]|<[^>]*>")
_NOT_WORD = re.compile(r"[^\w']+|(?<!\w)'|'(?!\w)")


@dataclass(frozen=True)
class LabelledUtterance:
    """One consensus-labelled utterance and where it was read from."""

    utt_id: str
    session: int
    gender: str
    raw_label: str
    wav_path: Path
    source: Path  # the EmoEvaluation file
    line: int  # 1-based line number in ``source``
    item: str = ""  # the recurring script line (module docstring); "" = none (improvised)

    @property
    def speaker(self) -> str:
        return f"Ses{self.session:02d}{self.gender}"


def emo_evaluation_files(root: Path) -> list[Path]:
    """The consensus files of every session, skipping sub-folders and macOS ``._*`` files."""
    root = Path(root)
    sessions = sorted(p for p in root.glob("Session*") if p.is_dir())
    if not sessions:
        raise CorpusError(
            f"{root}: no Session* folders found. corpus.root must point at the folder that "
            "holds Session1..Session5 (IEMOCAP_full_release)."
        )
    files = []
    for session in sessions:
        eval_dir = session / "dialog" / "EmoEvaluation"
        if not eval_dir.is_dir():
            raise CorpusError(f"{eval_dir}: missing; an IEMOCAP session keeps its labels there.")
        files += sorted(
            p
            for p in eval_dir.iterdir()
            if p.is_file() and p.suffix == ".txt" and not p.name.startswith("._")
        )
    return files


def parse_emo_evaluation(path: Path, root: Path) -> list[LabelledUtterance]:
    """Consensus lines of one EmoEvaluation file.

    Lines that start with ``[`` must be consensus lines; anything else that is not an
    evaluator line (``C-E2:``, ``A-E3:`` ...), the ``%`` header or blank is an error that
    names the file and line.
    """
    path = Path(path)
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path}: not UTF-8 text ({exc}); is this an EmoEvaluation file?"
        ) from exc
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.startswith("["):
            continue
        match = CONSENSUS_LINE.match(line)
        if match is None:
            raise CorpusError(
                f"{path}:{number}: malformed consensus line {line!r}; expected "
                "'[start - end]<TAB>SesNNX_dialog_X000<TAB>lab<TAB>[v, a, d]'."
            )
        utt = match["utt"]
        dialog = utt.rsplit("_", 1)[0]
        session = int(match["session"])
        out.append(
            LabelledUtterance(
                utt_id=utt,
                session=session,
                gender=match["gender"],
                raw_label=match["label"],
                wav_path=Path(root)
                / f"Session{session}"
                / "sentences"
                / "wav"
                / dialog
                / f"{utt}.wav",
                source=path,
                line=number,
            )
        )
    return out


def normalise_text(text: str) -> str:
    """A transcript as a comparable sentence identity: non-speech marks (``[LAUGHTER]``,
    ``<noise>``) dropped, lower case, punctuation removed (apostrophes inside words kept),
    whitespace collapsed. ``"Okay, [BREATHING] I'm  here!"`` -> ``"okay i'm here"``."""
    text = _NON_SPEECH.sub(" ", text).lower()
    return " ".join(_NOT_WORD.sub(" ", text).split())


def read_transcriptions(path: Path) -> dict[str, str]:
    """utt_id -> raw transcript of one ``transcriptions/<dialog>.txt``; {} if the file is absent."""
    path = Path(path)
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = TRANSCRIPTION_LINE.match(line)
        if match is not None:
            out[match["utt"]] = match["text"]
    return out


def is_scripted(utt_id: str) -> bool:
    """Whether the utterance belongs to a scripted dialog (``SesNNX_scriptNN_P_X000``)."""
    return utt_id.split("_")[1].startswith("script")


def script_item(utt_id: str, transcript: str | None) -> str:
    """The recurring item of one utterance (module docstring): the normalised transcript of a
    scripted line, else its ``script/turn``; ``""`` for improvised utterances."""
    if not is_scripted(utt_id):
        return ""
    if transcript is not None:
        return normalise_text(transcript)
    dialog, turn = utt_id.rsplit("_", 1)
    return f"{dialog.split('_', 1)[1]}/{turn}"


def read_iemocap(root: Path) -> list[LabelledUtterance]:
    """All consensus-labelled utterances of the tree, in file order, each with its recurring
    ``item`` (module docstring); duplicates are an error."""
    root = Path(root)
    utterances: list[LabelledUtterance] = []
    seen: dict[str, LabelledUtterance] = {}
    transcripts: dict[Path, dict[str, str]] = {}
    for path in emo_evaluation_files(root):
        for utt in parse_emo_evaluation(path, root):
            if is_scripted(utt.utt_id):
                dialog = utt.utt_id.rsplit("_", 1)[0]
                where = (
                    root / f"Session{utt.session}" / "dialog" / "transcriptions" / f"{dialog}.txt"
                )
                if where not in transcripts:
                    transcripts[where] = read_transcriptions(where)
                utt = replace(utt, item=script_item(utt.utt_id, transcripts[where].get(utt.utt_id)))
            if utt.utt_id in seen:
                first = seen[utt.utt_id]
                raise CorpusError(
                    f"{utt.source}:{utt.line}: utterance {utt.utt_id} is labelled twice "
                    f"(first at {first.source}:{first.line})."
                )
            seen[utt.utt_id] = utt
            utterances.append(utt)
    if not utterances:
        raise CorpusError(f"{root}: no consensus lines in any EmoEvaluation file.")
    return utterances
