"""Leave-one-session-out folds with a speaker-disjoint dev split.

Fold k holds out the k-th session (sessions in natural order) as test. The dev split, used
for checkpoint selection and early stopping, is another whole session, so its speakers
appear neither in train nor in test: choosing checkpoints on the test fold inflates results.

Corpora without sessions (EmoDB, RAVDESS, CREMA-D) get *speaker groups* in the session's
place (:func:`assign_speaker_groups`): ``folds.speaker_groups`` groups balanced by gender
(default five), or one group per speaker (``speaker``: leave-one-speaker-out). Corpora with
their own split (MSP-Podcast) have one fold, that split (:func:`fixed_split_folds`).
:func:`fold_summary` says per fold who is held out and whether the test sentences occur in
training (EmoDB and CREMA-D reuse their sentences across speakers).
"""

from __future__ import annotations

import re

import pandas as pd

from serlens.errors import CorpusError

DEV_STRATEGIES = ("next_session", "previous_session")


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def session_order(sessions) -> list[str]:
    """Sessions in natural order (``g2`` before ``g10``, ``2`` before ``10``)."""
    return sorted(set(map(str, sessions)), key=_natural)


def assign_speaker_groups(speakers: dict[str, str], groups: int | str = 5) -> dict[str, str]:
    """speaker -> group name, deterministic and balanced by gender.

    ``groups`` an integer k: speakers of each gender (in natural order, genders in sorted
    order) are dealt round-robin over ``g1`` … ``gk``, the next gender continuing where the
    previous one stopped, so group sizes differ by at most one and each group holds
    ⌊n_g/k⌋ or ⌈n_g/k⌉ speakers of every gender g (EmoDB's five men and five women: one of
    each per group). ``groups = "speaker"``: every speaker is its own group
    (leave-one-speaker-out), named after the speaker.
    """
    if groups == "speaker":
        return {s: str(s) for s in speakers}
    k = int(groups)
    if k < 3:
        raise CorpusError(
            f"folds.speaker_groups: {k} groups leave no separate test, dev and train speakers; use 3 or more."
        )
    if len(speakers) < k:
        raise CorpusError(
            f"folds.speaker_groups: {k} groups need at least {k} speakers; the corpus has "
            f"{len(speakers)} ({sorted(speakers)}). Lower folds.speaker_groups or use 'speaker'."
        )
    out, slot = {}, 0
    for gender in sorted(set(speakers.values())):
        for speaker in sorted((s for s, g in speakers.items() if g == gender), key=_natural):
            out[speaker] = f"g{slot % k + 1}"
            slot += 1
    return out


def fixed_split_folds(manifest: pd.DataFrame) -> pd.DataFrame:
    """One fold, the corpus's own split (manifest column ``split``: train, dev, test)."""
    split = manifest.get("split", pd.Series("", index=manifest.index)).fillna("").astype(str)
    missing = sorted(set(("train", "dev", "test")) - set(split))
    if missing:
        raise CorpusError(
            f"the corpus's own split has no {', '.join(missing)} utterances (manifest column "
            "split); check the corpus's labels file and corpus.classes."
        )
    return pd.DataFrame({"utt_id": manifest["utt_id"], "fold": 1, "split": split.to_numpy()})


def fold_summary(manifest: pd.DataFrame, folds: pd.DataFrame) -> pd.DataFrame:
    """Per fold: the held-out groups and speakers, split sizes, the test speakers' genders,
    and text overlap — how many test utterances say an item (sentence) that also occurs in
    the fold's training split (``test_items_in_train``, ``test_utts_item_in_train``)."""
    meta = manifest.set_index("utt_id")
    rows = []
    for fold, part in folds.groupby("fold", sort=True):
        by = {s: meta.loc[part.loc[part["split"] == s, "utt_id"]] for s in ("train", "dev", "test")}
        test, train = by["test"], by["train"]
        items = test["item"].fillna("").astype(str) if "item" in test else pd.Series(dtype=str)
        train_items = set(train["item"].fillna("").astype(str)) - {""} if "item" in train else set()
        with_item = items[items != ""]
        genders = test.drop_duplicates("speaker")["gender"].value_counts().sort_index()
        rows.append(
            {
                "fold": int(fold),
                "test_groups": " ".join(session_order(test["session"])),
                "dev_groups": " ".join(session_order(by["dev"]["session"])),
                "test_speakers": " ".join(session_order(test["speaker"])),
                "test_genders": " ".join(f"{g}:{n}" for g, n in genders.items()),
                "n_train": len(train),
                "n_dev": len(by["dev"]),
                "n_test": len(test),
                "test_items": int(with_item.nunique()),
                "test_items_in_train": int(len(set(with_item) & train_items)),
                "test_utts_item_in_train": int(with_item.isin(train_items).sum()),
            }
        )
    return pd.DataFrame(rows)


def leave_one_session_out(manifest: pd.DataFrame, dev: str = "next_session") -> pd.DataFrame:
    """``utt_id, fold, split`` for every utterance and fold (split in train/dev/test).

    dev = "next_session": the session after the test one (cyclically) is dev;
    "previous_session": the one before it.
    """
    if dev not in DEV_STRATEGIES:
        raise CorpusError(f"folds.dev: {dev!r} is not one of {', '.join(DEV_STRATEGIES)}.")
    sessions = session_order(manifest["session"])
    if len(sessions) < 3:
        raise CorpusError(
            f"leave-one-session-out needs at least 3 sessions (test, dev, train); the manifest has {sessions}."
        )
    shared = manifest.groupby("speaker")["session"].nunique()
    if (shared > 1).any():
        raise CorpusError(
            f"speaker(s) {list(shared[shared > 1].index[:5])} occur in several sessions; "
            "folds by session would leak speakers between splits."
        )
    step = 1 if dev == "next_session" else -1
    frames = []
    session = manifest["session"].astype(str)
    for k, test_session in enumerate(sessions, start=1):
        dev_session = sessions[(k - 1 + step) % len(sessions)]
        split = pd.Series("train", index=manifest.index)
        split[session == test_session] = "test"
        split[session == dev_session] = "dev"
        frames.append(pd.DataFrame({"utt_id": manifest["utt_id"], "fold": k, "split": split}))
    return pd.concat(frames, ignore_index=True)


PREFIX = re.compile(r"(?P<prefix>(?P<session>Ses\d\d)[FM])_")


def dialog_prefix_folds(manifest: pd.DataFrame, dev: str = "next_session") -> pd.DataFrame:
    """The paper's folds (its ``train_lora.py``): one test group per dialog prefix.

    IEMOCAP names a dialog ``Ses01F_impro01``: session 1, the actor in the F role leading. The
    paper's code splits utterance ids at the first ``_`` and calls ``Ses01F`` the "speaker",
    but a dialog holds both actors of its session, so testing on ``Ses01F`` while training on
    ``Ses01M`` puts both test speakers (and, for scripted dialogs, their lines) into training.
    Fold 2k − 1 tests on session k's F prefix and fold 2k on its M prefix (honest fold k's
    test utterances are exactly those of folds 2k − 1 and 2k). The paper has no dev split (it
    selects on the test group); here dev is the whole next (``previous_session``: previous)
    session, as in the honest folds, so this deviation changes only who is in training: the
    other half of the test session is.
    """
    match = manifest["utt_id"].astype(str).str.match(PREFIX.pattern)
    if not match.all():
        bad = manifest.loc[~match, "utt_id"].head(3).tolist()
        raise CorpusError(
            f"utterance ids {bad} have no IEMOCAP dialog prefix (SesNNF_ or SesNNM_); the "
            "prefix_folds deviation applies to IEMOCAP-named corpora only"
        )
    prefix = manifest["utt_id"].astype(str).str.extract(PREFIX)["prefix"]
    session = manifest["session"].astype(str)
    sessions = session_order(session)
    step = 1 if dev == "next_session" else -1
    frames, fold = [], 0
    for k, test_session in enumerate(sessions):
        dev_session = sessions[(k + step) % len(sessions)]
        for role in "FM":
            test = (session == test_session) & prefix.str.endswith(role)
            if not test.any():
                raise CorpusError(
                    f"session {test_session} has no dialog with prefix role {role}; the "
                    "paper's prefix folds need both (SesNNF_ and SesNNM_ dialogs)"
                )
            fold += 1
            split = pd.Series("train", index=manifest.index)
            split[test] = "test"
            split[session == dev_session] = "dev"
            frames.append(
                pd.DataFrame({"utt_id": manifest["utt_id"], "fold": fold, "split": split})
            )
    return pd.concat(frames, ignore_index=True)


def prefix_fold_numbers(honest_folds) -> list[int]:
    """The prefix folds whose test utterances are those of the honest folds given."""
    return [f for k in honest_folds for f in (2 * int(k) - 1, 2 * int(k))]


def fold_split(folds: pd.DataFrame, fold: int, split: str) -> list[str]:
    """Utterance ids of one split of one fold, in manifest order."""
    rows = folds[(folds["fold"] == int(fold)) & (folds["split"] == split)]
    if rows.empty:
        raise CorpusError(
            f"fold {fold} has no {split} utterances; check folds.tsv and config folds."
        )
    return rows["utt_id"].tolist()
