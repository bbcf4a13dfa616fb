"""The shipped corpus configs, and each reader through the registry to manifest, summary,
folds and fold summary (the steps the workflow runs)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_readers import msp_rows, write_cremad, write_msp, write_ravdess

from serlens.cli import _merge
from serlens.config import corpus_folds, corpus_specs, validate_config
from serlens.corpus.registry import corpus_kind, speaker_groups
from serlens.steps import make_folds, make_manifest

ROOT = Path(__file__).resolve().parents[1]
RAVDESS_ACTORS = tuple(f"{a:02d}" for a in range(1, 11))


def shipped(name: str, root: Path, tmp_path: Path, **folds) -> dict:
    """config/config.yaml with config/<name>.yaml over it, corpus.root set to ``root`` and
    ``folds`` keys over the config's."""
    base = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    config = _merge(base, yaml.safe_load((ROOT / f"config/{name}.yaml").read_text()))
    config["corpus"]["root"] = str(root)
    config["resources_dir"] = str(tmp_path / "resources")
    config["folds"] = {**config.get("folds", {}), **folds}
    return validate_config(config)


def run_corpus_steps(config: dict, out: Path):
    ((name, spec),) = corpus_specs(config).items()
    manifest = make_manifest(
        {k: v for k, v in spec.items() if k != "synthetic"},
        Path(spec["root"]),
        out / "manifest.tsv",
        out / "summary.tsv",
    )
    folds = make_folds(
        spec["folds"]["dev"],
        out / "manifest.tsv",
        out / "folds.tsv",
        grouping=corpus_kind(spec["kind"]).grouping,
        summary_out=out / "fold_summary.tsv",
    )
    summary = pd.read_csv(out / "summary.tsv", sep="\t", keep_default_na=False)
    fold_summary = pd.read_csv(
        out / "fold_summary.tsv", sep="\t", dtype={"test_speakers": str, "test_groups": str}
    )
    groups = speaker_groups(spec, config["resources_dir"], name)
    return manifest, folds, summary, fold_summary, corpus_folds(spec, groups)


def test_ravdess_config_reads_to_gender_balanced_folds(tmp_path):
    root = write_ravdess(tmp_path / "ravdess", actors=RAVDESS_ACTORS, songs=1, audio=True)
    config = shipped("ravdess", root, tmp_path)
    manifest, folds, summary, fold_summary, runs = run_corpus_steps(config, tmp_path / "out")
    assert runs == [1, 2, 3, 4, 5] and sorted(folds["fold"].unique()) == runs
    assert set(manifest["label"]) == {"neu", "hap", "ang", "sad"}
    song = summary[summary["status"].str.startswith("skipped: ")]
    assert song["n"].sum() == len(RAVDESS_ACTORS)  # one song file per actor, counted
    dropped = summary[summary["status"].str.startswith("dropped")]
    assert set(dropped["raw_label"]) == {"cal", "fea", "dis", "sur"}
    assert (fold_summary["test_genders"] == "F:1 M:1").all()  # five groups of one man, one woman
    assert (fold_summary["test_utts_item_in_train"] > 0).all()  # the statements recur


def test_cremad_config_reads_and_says_the_sentences_recur(tmp_path):
    root = write_cremad(tmp_path / "cremad", audio=True)
    config = shipped("cremad", root, tmp_path, speaker_groups="speaker")  # three actors
    manifest, folds, _, fold_summary, runs = run_corpus_steps(config, tmp_path / "out")
    assert runs == [1, 2, 3] and set(manifest["speaker"]) == {"1001", "1002", "1091"}
    assert list(fold_summary["test_speakers"]) == ["1001", "1002", "1091"]
    assert (fold_summary["test_items_in_train"] == fold_summary["test_items"]).all()


def test_msp_podcast_config_uses_the_corpus_split_as_its_one_fold(tmp_path):
    root = write_msp(tmp_path / "msp", msp_rows(), audio=True)
    config = shipped("msp_podcast", root, tmp_path)
    manifest, folds, summary, fold_summary, runs = run_corpus_steps(config, tmp_path / "out")
    assert runs == [1] and list(folds["fold"].unique()) == [1]
    split = folds.set_index("utt_id")["split"]
    assert (split[manifest["utt_id"]].to_numpy() == manifest["split"].to_numpy()).all()
    unknown = manifest[manifest["speaker"].str.startswith("unknown:")]
    assert unknown["speaker"].is_unique and len(unknown) == 2  # each its own cluster
    skipped = summary[summary["status"].str.startswith("skipped: ")]
    assert skipped["n"].sum() == 3  # Test2 (2) and Test3 (1) are counted, not read
    assert fold_summary.loc[0, "n_test"] == 2


@pytest.mark.parametrize("name", ["emodb", "ravdess", "cremad", "msp_podcast"])
def test_shipped_configs_name_a_root_to_set(name):
    text = (ROOT / f"config/{name}.yaml").read_text()
    assert "root: /path/to/" in text
    config = yaml.safe_load(text)
    assert config["corpus"]["kind"] == name and config["corpus"]["classes"] == [
        "neu",
        "hap",
        "ang",
        "sad",
    ]


def test_cross_corpus_example_config_names_two_corpora_both_ways():
    config = yaml.safe_load((ROOT / "config/emodb_cross.yaml").read_text())
    assert set(config["corpora"]) == {"synthetic", "emodb"}
    assert sorted(map(tuple, config["cross_corpus"])) == [
        ("emodb", "synthetic"),
        ("synthetic", "emodb"),
    ]
