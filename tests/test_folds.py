"""Speaker groups for corpora without sessions, the corpus's own split, fold summaries, and
corpus as a dimension of the grid (config)."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import pytest

from serlens.config import corpus_folds, corpus_specs, validate_config
from serlens.corpus.folds import (
    assign_speaker_groups,
    fixed_split_folds,
    fold_summary,
    leave_one_session_out,
    session_order,
)
from serlens.errors import ConfigError, CorpusError

# RAVDESS: 24 actors, odd male, even female
RAVDESS = {f"{a:02d}": "M" if a % 2 else "F" for a in range(1, 25)}


def test_natural_order_puts_g2_before_g10():
    assert session_order(["g10", "g2", "g1"]) == ["g1", "g2", "g10"]
    assert session_order(["10", "2", "1"]) == ["1", "2", "10"]


@pytest.mark.parametrize("k", [3, 5, 7])
def test_groups_are_balanced_by_gender_and_by_size(k):
    groups = assign_speaker_groups(RAVDESS, k)
    assert set(groups) == set(RAVDESS)
    sizes = Counter(groups.values())
    assert len(sizes) == k and max(sizes.values()) - min(sizes.values()) <= 1
    for gender in ("M", "F"):
        per = Counter(g for s, g in groups.items() if RAVDESS[s] == gender)
        assert max(per.values()) - min(per.values()) <= 1, (gender, per)
    assert assign_speaker_groups(dict(reversed(RAVDESS.items())), k) == groups  # deterministic


def test_leave_one_speaker_out_gives_every_speaker_its_group():
    groups = assign_speaker_groups(RAVDESS, "speaker")
    assert groups == {s: s for s in RAVDESS}


def test_too_few_speakers_or_groups_are_errors():
    with pytest.raises(CorpusError, match="need at least 5 speakers"):
        assign_speaker_groups({"a": "M", "b": "F", "c": "M"}, 5)
    with pytest.raises(CorpusError, match="use 3 or more"):
        assign_speaker_groups(RAVDESS, 2)


def _manifest(speakers: dict[str, str], groups, per_speaker=4, items=("s1", "s2")):
    assignment = assign_speaker_groups(speakers, groups)
    rows = []
    for s, gender in speakers.items():
        for i in range(per_speaker):
            rows.append(
                {
                    "utt_id": f"{s}_{i}",
                    "session": assignment[s],
                    "speaker": s,
                    "gender": gender,
                    "label": ["neu", "ang"][i % 2],
                    "item": items[i % len(items)],
                    "split": "",
                }
            )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("groups", [5, "speaker"])
def test_speaker_group_folds_are_speaker_disjoint_and_test_everything_once(groups):
    manifest = _manifest(RAVDESS, groups)
    folds = leave_one_session_out(manifest, "next_session")
    speaker = manifest.set_index("utt_id")["speaker"]
    n_folds = 5 if groups == 5 else 24
    assert folds["fold"].nunique() == n_folds
    for _, rows in folds.groupby("fold"):
        split = {s: set(speaker[rows.loc[rows["split"] == s, "utt_id"]]) for s in rows["split"]}
        assert not split["train"] & split["test"] and not split["dev"] & split["test"]
        assert not split["train"] & split["dev"]
    tested = folds.loc[folds["split"] == "test", "utt_id"]
    assert sorted(tested) == sorted(manifest["utt_id"])


def test_fold_summary_reports_speakers_genders_and_text_overlap():
    manifest = _manifest(RAVDESS, 5)
    # one speaker of group g1 says a sentence nobody else says
    first = manifest.loc[manifest["session"] == "g1", "utt_id"].iloc[0]
    manifest.loc[manifest["utt_id"] == first, "item"] = "only_here"
    folds = leave_one_session_out(manifest, "next_session")
    summary = fold_summary(manifest, folds).set_index("fold")
    assert list(summary.index) == [1, 2, 3, 4, 5]
    assert summary.loc[1, "test_groups"] == "g1" and summary.loc[1, "dev_groups"] == "g2"
    assert summary.loc[1, "test_genders"].count(":") == 2  # both genders held out
    # g1's test utterances: s1/s2 recur in training, "only_here" does not
    n_test = summary.loc[1, "n_test"]
    assert summary.loc[1, "test_items"] == 3 and summary.loc[1, "test_items_in_train"] == 2
    assert summary.loc[1, "test_utts_item_in_train"] == n_test - 1
    assert (summary["n_train"] + summary["n_dev"] + summary["n_test"] == len(manifest)).all()


def test_fixed_split_is_one_fold_and_needs_all_three_parts():
    manifest = pd.DataFrame(
        {"utt_id": ["a", "b", "c", "d"], "split": ["train", "dev", "test", "train"]}
    )
    folds = fixed_split_folds(manifest)
    assert list(folds["fold"].unique()) == [1] and list(folds["split"]) == list(manifest["split"])
    with pytest.raises(CorpusError, match="no dev"):
        fixed_split_folds(manifest[manifest["split"] != "dev"])


def test_single_corpus_key_is_one_corpus_named_after_its_kind_or_name():
    specs = corpus_specs(validate_config({}))
    assert list(specs) == ["synthetic"] and specs["synthetic"]["folds"]["run"] == "all"
    named = corpus_specs(validate_config({"corpus": {"name": "espeak"}}))
    assert list(named) == ["espeak"]


def test_corpora_grid_merges_each_corpus_folds_over_the_top_level(tmp_path):
    config = validate_config(
        {
            "folds": {"run": [1, 2]},
            "corpora": {
                "syn_a": {"kind": "synthetic"},
                "syn_b": {
                    "kind": "synthetic",
                    "folds": {"run": [3]},
                    "classes": ["neu", "ang"],
                    "merge": {},
                },
            },
            "cross_corpus": [["syn_a", "syn_b"]],
        }
    )
    specs = corpus_specs(config)
    assert specs["syn_a"]["folds"]["run"] == [1, 2] and specs["syn_b"]["folds"]["run"] == [3]
    assert specs["syn_a"]["merge"] == {"exc": "hap"}  # defaults filled per corpus
    assert corpus_folds(specs["syn_a"], ["1", "2", "3", "4", "5"]) == [1, 2]
    assert corpus_folds({"folds": {"run": "all"}}, ["g1", "g2", "g3"]) == [1, 2, 3]


@pytest.mark.parametrize(
    "pairs, message",
    [
        ([["syn_a", "nowhere"]], r"names corpora \['nowhere'\]"),
        ([["syn_a", "syn_a"]], "trains and tests on one corpus"),
    ],
)
def test_cross_corpus_pairs_must_name_corpora_of_the_grid(pairs, message):
    config = {"corpora": {"syn_a": {"kind": "synthetic"}}, "cross_corpus": pairs}
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_a_corpus_without_its_root_names_its_key_in_the_grid():
    config = {"corpora": {"berlin": {"kind": "emodb"}}}
    with pytest.raises(ConfigError, match=r"corpora\.berlin\.root: must be set"):
        validate_config(config)
