"""Leave-one-session-out folds with a speaker-disjoint dev split.

Fold k holds out the k-th session (sessions in natural order) as test. The dev split, used
for checkpoint selection and early stopping, is another whole session, so its speakers
appear neither in train nor in test: choosing checkpoints on the test fold inflates results.
"""

from __future__ import annotations

import pandas as pd

from serlens.errors import CorpusError

DEV_STRATEGIES = ("next_session", "previous_session")


def session_order(sessions) -> list[str]:
    """Sessions in natural order: numerically when every name is a number."""
    unique = sorted(set(map(str, sessions)))
    if all(s.isdigit() for s in unique):
        unique.sort(key=int)
    return unique


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


def fold_split(folds: pd.DataFrame, fold: int, split: str) -> list[str]:
    """Utterance ids of one split of one fold, in manifest order."""
    rows = folds[(folds["fold"] == int(fold)) & (folds["split"] == split)]
    if rows.empty:
        raise CorpusError(
            f"fold {fold} has no {split} utterances; check folds.tsv and config folds."
        )
    return rows["utt_id"].tolist()
