"""Read an IEMOCAP_full_release tree as distributed (and the synthetic corpus, which copies its layout).

Layout read::

    Session{n}/dialog/EmoEvaluation/<dialog>.txt        consensus labels (only this level)
    Session{n}/sentences/wav/<dialog>/<utt_id>.wav      one file per utterance

A consensus line looks like ``[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]``.
The speaker of an utterance is its session plus the gender letter of the utterance id's *last*
segment (``Ses01F_impro01_M003`` is spoken by Ses01M), not the dialog prefix, which names who
wore the motion-capture markers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from serlens.errors import CorpusError

CONSENSUS_LINE = re.compile(
    r"^\[(?P<start>\d+(?:\.\d+)?) - (?P<end>\d+(?:\.\d+)?)\]\t"
    r"(?P<utt>Ses(?P<session>\d\d)[FM]_\S+_(?P<gender>[FM])\d+)\t"
    r"(?P<label>[a-z]{3})\t"
    r"\[(?P<vad>[^\]]*)\]\s*$"
)


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


def read_iemocap(root: Path) -> list[LabelledUtterance]:
    """All consensus-labelled utterances of the tree, in file order; duplicates are an error."""
    utterances: list[LabelledUtterance] = []
    seen: dict[str, LabelledUtterance] = {}
    for path in emo_evaluation_files(root):
        for utt in parse_emo_evaluation(path, root):
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
