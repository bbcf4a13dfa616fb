"""EmoDB: labels from the file names, speaker-group folds; on a tree in EmoDB's naming and on the real copy."""

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from serlens.config import validate_config
from serlens.corpus import emodb
from serlens.corpus.emodb import EMOTIONS, SPEAKERS, parse_name, read_emodb
from serlens.corpus.folds import assign_speaker_groups, leave_one_session_out
from serlens.corpus.manifest import build_manifest
from serlens.corpus.registry import read_candidates
from serlens.errors import ConfigError, CorpusError

EMODB = Path(__file__).resolve().parents[2] / "shared" / "data" / "emodb"
LETTERS = "WLEAFTN"


def write_emodb(root: Path, per_speaker: int = 7, rate: int = 22050) -> Path:
    """Every actor says ``per_speaker`` utterances, emotions cycling over W L E A F T N."""
    wav = root / "wav"
    wav.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for speaker in sorted(SPEAKERS):
        for i in range(per_speaker):
            name = f"{speaker}a0{i % 5 + 1}{LETTERS[i % 7]}{'abc'[i // 7 % 3]}.wav"
            wave = 0.2 * np.sin(2 * np.pi * (120 + 20 * i) * np.arange(rate) / rate)
            sf.write(wav / name, (wave + 0.01 * rng.standard_normal(rate)).astype(np.float32), rate)
    (wav / "notes.txt").write_text("not audio\n")
    return root


def test_names_give_speaker_text_label_and_gender():
    u = parse_name(Path("wav/03a01Fa.wav"))
    assert (u.utt_id, u.speaker, u.gender, u.text, u.raw_label) == (
        "03a01Fa",
        "03",
        "M",
        "a01",
        "hap",
    )
    assert parse_name(Path("wav/16b10Wc.wav")).raw_label == "ang"
    assert parse_name(Path("wav/08a02Nb.wav")).gender == "F"


@pytest.mark.parametrize(
    "name, message",
    [
        ("3a01Fa.wav", "not an EmoDB file name"),
        ("03a01Xa.wav", "emotion letter 'X'"),
        ("07a01Fa.wav", "speaker '07'"),
        ("03a01Fa.mp3", "not an EmoDB file name"),
    ],
)
def test_malformed_names_are_errors_that_name_the_file(name, message):
    with pytest.raises(CorpusError, match=message) as error:
        parse_name(Path("wav") / name)
    assert name in str(error.value)


def test_groups_pair_one_male_with_one_female_speaker():
    groups = assign_speaker_groups(SPEAKERS, 5)
    assert sorted(set(groups.values())) == [f"g{k}" for k in range(1, 6)]
    for group in set(groups.values()):
        members = [s for s, g in groups.items() if g == group]
        assert sorted(SPEAKERS[s] for s in members) == ["F", "M"]


def test_tree_reads_into_a_manifest_and_speaker_independent_folds(tmp_path):
    root = write_emodb(tmp_path / "emodb")
    corpus = validate_config({"corpus": {"kind": "emodb", "root": str(root)}})["corpus"]
    manifest, summary = build_manifest(
        read_candidates(corpus, root), corpus["classes"], corpus["merge"], "error"
    )
    # 7 utterances per actor, one per emotion: four kept (neu, hap, ang, sad), three dropped
    assert len(manifest) == 10 * 4
    dropped = summary[summary["status"].str.startswith("dropped")]
    assert set(dropped["raw_label"]) == {"bor", "dis", "fea"} and dropped["n"].sum() == 30
    folds = leave_one_session_out(manifest, "next_session")
    assert sorted(folds["fold"].unique()) == [1, 2, 3, 4, 5]
    speaker = manifest.set_index("utt_id")["speaker"]
    for _fold, rows in folds.groupby("fold"):
        splits = {
            s: set(speaker[rows[rows["split"] == s]["utt_id"]]) for s in ("train", "dev", "test")
        }
        assert not (splits["train"] & splits["test"]) and not (splits["dev"] & splits["test"])
        assert not (splits["train"] & splits["dev"]) and len(splits["test"]) == 2
    tested = folds[folds["split"] == "test"]["utt_id"]
    assert sorted(tested) == sorted(manifest["utt_id"])  # every utterance tested exactly once


def test_text_codes_are_the_recurring_items(tmp_path):
    root = write_emodb(tmp_path / "emodb")
    corpus = validate_config({"corpus": {"kind": "emodb", "root": str(root)}})["corpus"]
    candidates = read_candidates(corpus, root)
    assert all(c.item == c.utt_id[2:5] for c in candidates)
    assert {c.session for c in candidates} == set(assign_speaker_groups(SPEAKERS, 5).values())
    manifest, _ = build_manifest(candidates, ["neu", "hap", "ang", "sad"], {}, "error")
    assert (manifest["item"] == manifest["utt_id"].str[2:5]).all()
    assert set(manifest["item"]) == {"a01", "a02", "a05"}  # the texts of the kept emotions
    per_item = manifest.groupby("item")["speaker"].nunique()
    assert (per_item == 10).all()  # every actor says every text


def test_missing_folder_and_unknown_kind_are_config_errors(tmp_path):
    with pytest.raises(
        ConfigError, match=r"corpus.root: .* does not exist; point it at an EmoDB folder"
    ):
        validate_config({"corpus": {"kind": "emodb", "root": str(tmp_path / "nowhere")}})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no wav/ folder"):
        validate_config({"corpus": {"kind": "emodb", "root": str(tmp_path / "empty")}})


@pytest.mark.skipif(not (EMODB / "wav").is_dir(), reason=f"the EmoDB copy is not at {EMODB}")
def test_the_real_copy_reads_as_its_readme_counts():
    utterances = read_emodb(EMODB)
    assert len(utterances) == 535
    counts = Counter(u.utt_id[5] for u in utterances)  # the emotion letter of SSTTTEV
    assert counts == {"W": 127, "L": 81, "N": 79, "F": 71, "A": 69, "T": 62, "E": 46}
    assert all(u.raw_label == EMOTIONS[u.utt_id[5]] for u in utterances)
    per_speaker = Counter(u.speaker for u in utterances)
    assert set(per_speaker) == set(SPEAKERS) and min(per_speaker.values()) == 35
    assert max(per_speaker.values()) == 71
    assert len({u.text for u in utterances}) == 10
    from serlens.config import corpus_folds, corpus_specs
    from serlens.corpus.registry import speaker_groups

    config = validate_config({"corpus": {"kind": "emodb", "root": str(EMODB)}})
    spec = corpus_specs(config)["emodb"]
    assert corpus_folds(spec, speaker_groups(spec, config["resources_dir"])) == [1, 2, 3, 4, 5]
    manifest = pd.DataFrame([u.__dict__ for u in utterances])
    assert manifest.groupby("speaker")["gender"].nunique().eq(1).all()


@pytest.mark.skipif(not (EMODB / "wav").is_dir(), reason=f"the EmoDB copy is not at {EMODB}")
def test_the_real_copy_has_ten_items_said_by_every_actor():
    candidates = emodb.read(EMODB, {})
    items = Counter(c.item for c in candidates)
    assert len(items) == 10 and sorted(items) == sorted({u.text for u in read_emodb(EMODB)})
    assert min(items.values()) >= 40  # each text in several emotions by every actor
    for item in items:
        assert len({c.speaker for c in candidates if c.item == item}) == 10
