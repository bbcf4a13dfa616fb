"""Corpus kinds: kind -> reader and the speaker groups the folds hold out, one at a time.

``config["corpus"]["kind"]`` is looked up here and nowhere else. An unknown kind is a
config error naming the known ones (it is never read as IEMOCAP), and the number of folds
(sessions, or other speaker groups) comes from the data, not from a constant.

Adding a corpus is one :class:`CorpusKind` entry: its reader (root -> manifest candidates),
how its speaker groups are counted from the raw tree before the manifest exists (the
workflow needs the fold list when it builds the DAG), and whether the workflow generates it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serlens.errors import ConfigError, CorpusError


@dataclass(frozen=True)
class CorpusKind:
    """One kind of corpus.

    ``read(root)`` gives the manifest candidates, each with the speaker group its folds hold
    out in ``session`` (IEMOCAP's sessions, EmoDB's speaker pairs): every kind's folds are
    leave-one-group-out over that column (:func:`serlens.corpus.folds.leave_one_session_out`).
    ``groups(root, settings)`` gives the sorted group names, read cheaply from the tree (no
    audio), so the fold list is known when the workflow builds its DAG; ``generated`` marks
    corpora the workflow writes itself (``root`` is then ``{resources}/corpus/{kind}``).
    """

    name: str
    read: Callable[[Path], list]
    groups: Callable[[Path, dict], list[str]]
    generated: bool = False
    root_is: str = "a folder"


def _iemocap_read(root: Path) -> list:
    from serlens.corpus.manifest import iemocap_candidates

    return iemocap_candidates(root)


def _iemocap_sessions(root: Path, settings: dict) -> list[str]:
    sessions = sorted(
        p.name.removeprefix("Session") for p in Path(root).glob("Session*") if p.is_dir()
    )
    if not sessions:
        raise CorpusError(
            f"{root}: no Session* folders; corpus.root must be an IEMOCAP_full_release folder."
        )
    return sessions


def _synthetic_sessions(root: Path, settings: dict) -> list[str]:
    from serlens.corpus.synth import SESSION_VOICES

    return [str(s) for s in sorted(SESSION_VOICES)]


def _manifest_read(root: Path) -> list:
    from serlens.corpus.manifest import user_manifest_candidates

    return user_manifest_candidates(root)


def _manifest_sessions(root: Path, settings: dict) -> list[str]:
    import csv

    with Path(root).open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        if "session" not in (reader.fieldnames or []):
            raise CorpusError(f"{root}:1: header lacks column 'session'.")
        return sorted({(row["session"] or "").strip() for row in reader} - {""})


def _emodb_read(root: Path) -> list:
    from serlens.corpus.manifest import emodb_candidates

    return emodb_candidates(root)


def _emodb_groups(root: Path, settings: dict) -> list[str]:
    from serlens.corpus.emodb import read_emodb, speaker_groups

    groups = speaker_groups()
    return sorted({groups[u.speaker] for u in read_emodb(root)})


CORPORA: dict[str, CorpusKind] = {
    kind.name: kind
    for kind in [
        CorpusKind("synthetic", _iemocap_read, _synthetic_sessions, generated=True),
        CorpusKind("iemocap", _iemocap_read, _iemocap_sessions),
        CorpusKind("manifest", _manifest_read, _manifest_sessions, root_is="a TSV file"),
        CorpusKind(
            "emodb",
            _emodb_read,
            _emodb_groups,
            root_is="an EmoDB folder holding wav/",
        ),
    ]
}


def corpus_kind(kind: str) -> CorpusKind:
    """The registered kind; ConfigError naming ``corpus.kind`` and the known kinds otherwise."""
    try:
        return CORPORA[kind]
    except KeyError:
        raise ConfigError(
            f"config key corpus.kind: {kind!r} is not a known corpus; allowed values: {sorted(CORPORA)}"
        ) from None


def corpus_root(corpus: dict, resources_dir: str | Path) -> Path:
    """Where the corpus is read from: the generated folder, or ``corpus.root``."""
    kind = corpus_kind(corpus["kind"])
    if kind.generated:
        return Path(resources_dir) / "corpus" / kind.name
    if not corpus.get("root"):
        raise ConfigError(f"config key corpus.root: must be set for corpus.kind {kind.name!r}")
    return Path(corpus["root"])


def speaker_groups(corpus: dict, resources_dir: str | Path) -> list[str]:
    """The corpus' speaker groups in fold order (fold k holds out the k-th)."""
    kind = corpus_kind(corpus["kind"])
    root = corpus_root(corpus, resources_dir)
    if not kind.generated and not root.exists():
        raise ConfigError(
            f"config key corpus.root: {str(root)!r} does not exist; point it at {kind.root_is}"
        )
    from serlens.corpus.folds import session_order

    return session_order(kind.groups(root, corpus))


def read_candidates(corpus: dict, root: Path) -> list:
    return corpus_kind(corpus["kind"]).read(Path(root))
