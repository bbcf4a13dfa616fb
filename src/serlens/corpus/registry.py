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

GROUPINGS = ("sessions", "speakers", "split")


@dataclass(frozen=True)
class CorpusKind:
    """One kind of corpus.

    ``read(root, settings)`` gives the manifest candidates (:class:`~serlens.corpus.manifest.Candidate`);
    ``settings`` is the corpus's config (its reader options). How its folds are formed is
    its ``grouping``:

    - ``sessions``: the reader fills ``session`` (IEMOCAP's five); folds are
      leave-one-session-out, ``listing(root, settings)`` gives the session names;
    - ``speakers``: a corpus without sessions (EmoDB, RAVDESS, CREMA-D); ``listing`` gives
      speaker -> gender and the speakers are put into ``folds.speaker_groups`` groups
      balanced by gender (:func:`serlens.corpus.folds.assign_speaker_groups`), which then
      serve as sessions;
    - ``split``: the corpus's own train/dev/test split (MSP-Podcast), one fold.

    ``listing`` reads names only (no audio), so the fold list is known when the workflow
    builds its DAG. ``skipped(root, settings)`` counts files the reader leaves out by design
    (RAVDESS's songs), written to ``summary.tsv``. ``generated`` marks corpora the workflow
    writes itself (``root`` is then ``{resources}/corpus/{name}``). ``dialog_prefixes``: its
    utterance ids carry IEMOCAP's dialog prefix, so the paper's prefix folds can be formed.
    """

    name: str
    read: Callable[[Path, dict], list]
    listing: Callable[[Path, dict], object]
    grouping: str = "sessions"
    generated: bool = False
    root_is: str = "a folder"
    skipped: Callable[[Path, dict], dict] | None = None
    #: utterance ids carry IEMOCAP's dialog prefix (``Ses01F_``): the paper's folds apply
    dialog_prefixes: bool = False


def _iemocap_read(root: Path, settings: dict) -> list:
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


def _manifest_read(root: Path, settings: dict) -> list:
    from serlens.corpus.manifest import user_manifest_candidates

    return user_manifest_candidates(root)


def _manifest_sessions(root: Path, settings: dict) -> list[str]:
    import csv

    with Path(root).open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        if "session" not in (reader.fieldnames or []):
            raise CorpusError(f"{root}:1: header lacks column 'session'.")
        return sorted({(row["session"] or "").strip() for row in reader} - {""})


def _module(name: str):
    import importlib

    return importlib.import_module(f"serlens.corpus.{name}")


def _reader(module: str, grouping: str, root_is: str) -> CorpusKind:
    """A kind whose module exposes ``read``, ``speakers`` (or nothing for ``split``) and
    ``skipped`` with the ``(root, settings)`` signature."""

    def read(root, settings):
        return _module(module).read(root, settings)

    def listing(root, settings):
        return _module(module).speakers(root, settings)

    def skipped(root, settings):
        return _module(module).skipped(root, settings)

    return CorpusKind(module, read, listing, grouping, root_is=root_is, skipped=skipped)


CORPORA: dict[str, CorpusKind] = {
    kind.name: kind
    for kind in [
        CorpusKind(
            "synthetic", _iemocap_read, _synthetic_sessions, generated=True, dialog_prefixes=True
        ),
        CorpusKind("iemocap", _iemocap_read, _iemocap_sessions, dialog_prefixes=True),
        CorpusKind("manifest", _manifest_read, _manifest_sessions, root_is="a TSV file"),
        _reader("emodb", "speakers", "an EmoDB folder holding wav/"),
        _reader("ravdess", "speakers", "a RAVDESS folder holding Actor_01/ ... Actor_24/"),
        _reader("cremad", "speakers", "a CREMA-D folder holding AudioWAV/"),
        _reader("msp_podcast", "split", "an MSP-Podcast folder holding Labels/ and Audios/"),
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


def corpus_root(corpus: dict, resources_dir: str | Path, name: str | None = None) -> Path:
    """Where the corpus is read from: the generated folder (``{resources}/corpus/{name}``,
    name = the corpus's name in the grid, its kind by default), or ``corpus.root``."""
    kind = corpus_kind(corpus["kind"])
    if kind.generated:
        return Path(resources_dir) / "corpus" / (name or corpus.get("name") or kind.name)
    if not corpus.get("root"):
        raise ConfigError(f"config key corpus.root: must be set for corpus.kind {kind.name!r}")
    return Path(corpus["root"])


def _group_setting(corpus: dict):
    return (corpus.get("folds") or {}).get("speaker_groups", 5)


def speaker_groups(corpus: dict, resources_dir: str | Path, name: str | None = None) -> list[str]:
    """The corpus' speaker groups in fold order (fold k holds out the k-th); a corpus with
    its own split has one fold, named ``split``."""
    kind = corpus_kind(corpus["kind"])
    root = corpus_root(corpus, resources_dir, name)
    if not kind.generated and not root.exists():
        raise ConfigError(
            f"config key corpus.root: {str(root)!r} does not exist; point it at {kind.root_is}"
        )
    from serlens.corpus.folds import assign_speaker_groups, session_order

    if kind.grouping == "split":
        return ["split"]
    if kind.grouping == "speakers":
        return session_order(
            assign_speaker_groups(kind.listing(root, corpus), _group_setting(corpus)).values()
        )
    return session_order(kind.listing(root, corpus))


def read_candidates(corpus: dict, root: Path) -> list:
    """The corpus's manifest candidates; for a corpus without sessions, each speaker's
    group (:func:`serlens.corpus.folds.assign_speaker_groups`) is its ``session``."""
    import dataclasses

    from serlens.corpus.folds import assign_speaker_groups

    kind = corpus_kind(corpus["kind"])
    candidates = kind.read(Path(root), corpus)
    if kind.grouping != "speakers":
        return candidates
    genders = {c.speaker: c.gender for c in candidates}
    groups = assign_speaker_groups(genders, _group_setting(corpus))
    return [dataclasses.replace(c, session=groups[c.speaker]) for c in candidates]


def skipped_files(corpus: dict, root: Path) -> dict[str, int]:
    """Files the reader leaves out by design, by reason (written to ``summary.tsv``)."""
    kind = corpus_kind(corpus["kind"])
    return dict(kind.skipped(Path(root), corpus)) if kind.skipped else {}
