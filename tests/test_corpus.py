import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from iemocap_tree import tone, write_tree

from serlens.corpus.folds import leave_one_session_out
from serlens.corpus.iemocap import emo_evaluation_files, parse_emo_evaluation, read_iemocap
from serlens.corpus.manifest import (
    build_manifest,
    iemocap_candidates,
    map_label,
    user_manifest_candidates,
)
from serlens.errors import CorpusError

CLASSES = ["neu", "hap", "ang", "sad"]
MERGE = {"exc": "hap"}


@pytest.fixture()
def tree(tmp_path):
    return write_tree(tmp_path / "IEMOCAP_full_release")


def test_only_top_level_evaluation_files_are_read(tree):
    files = emo_evaluation_files(tree)
    assert len(files) == 5
    assert all(f.parent.name == "EmoEvaluation" and not f.name.startswith("._") for f in files)


def test_consensus_line_fields_and_speaker_from_last_segment(tree):
    utts = parse_emo_evaluation(tree / "Session1/dialog/EmoEvaluation/Ses01F_impro01.txt", tree)
    assert len(utts) == 8
    first, second = utts[0], utts[1]
    assert first.utt_id == "Ses01F_impro01_F000" and first.raw_label == "hap" and first.line == 3
    # The dialog prefix says F, but the utterance's own last segment says M.
    assert (
        second.utt_id == "Ses01F_impro01_M001"
        and second.speaker == "Ses01M"
        and second.gender == "M"
    )
    assert second.wav_path == tree / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_M001.wav"


def test_label_mapping_drops_and_counts(tree):
    manifest, summary = build_manifest(iemocap_candidates(tree), CLASSES, MERGE)
    assert set(manifest["label"]) == set(CLASSES)
    raw = [u.raw_label for u in read_iemocap(tree)]
    kept = sum(map_label(r, CLASSES, MERGE) is not None for r in raw)
    assert len(manifest) == kept
    dropped = summary[summary.status.str.startswith("dropped")]
    assert set(dropped.raw_label) == {"fru", "xxx", "sur"}
    assert summary["n"].sum() == len(raw)
    exc = summary[summary.raw_label == "exc"]
    assert list(exc.label) == ["hap"] and list(exc.status) == ["kept"]
    assert list(manifest.columns) == [
        "utt_id",
        "path",
        "session",
        "speaker",
        "gender",
        "label",
        "duration_s",
    ]
    assert manifest["duration_s"].between(0.9, 2.0).all()


def test_malformed_line_names_file_and_line(tree):
    path = tree / "Session2/dialog/EmoEvaluation/Ses02F_impro01.txt"
    lines = path.read_text().split("\n")
    lines[2] = lines[2].replace("\t", " ", 1)
    path.write_text("\n".join(lines))
    with pytest.raises(CorpusError, match=r"Ses02F_impro01.txt:3: malformed"):
        read_iemocap(tree)


@pytest.mark.parametrize("damage", ["missing", "empty", "silent", "garbage"])
def test_bad_audio_names_the_file(tree, damage):
    utt = read_iemocap(tree)[0]
    wav = utt.wav_path
    if damage == "missing":
        wav.unlink()
    elif damage == "empty":
        sf.write(wav, np.zeros(0, dtype=np.float32), 16000)
    elif damage == "silent":
        sf.write(wav, np.zeros(16000, dtype=np.float32), 16000)
    else:
        wav.write_bytes(b"not a wav")
    candidates = iemocap_candidates(tree)
    with pytest.raises(CorpusError, match=wav.name) as info:
        build_manifest(candidates, CLASSES, MERGE)
    assert "Ses01F_impro01.txt:3" in str(info.value)
    manifest, summary = build_manifest(candidates, CLASSES, MERGE, on_bad_audio="drop")
    assert utt.utt_id not in set(manifest.utt_id)
    assert summary.query("status == 'dropped: bad audio'")["n"].sum() == 1


def test_other_sample_rate_is_kept_and_logged(tree, caplog):
    utt = read_iemocap(tree)[0]
    sf.write(utt.wav_path, tone(1.0, 300, 22050), 22050)
    manifest, _ = build_manifest(iemocap_candidates(tree), CLASSES, MERGE)
    assert utt.utt_id in set(manifest.utt_id)
    assert "22050 Hz" in caplog.text


def test_user_manifest(tmp_path, tree):
    rows = [
        {"path": str(u.wav_path), "label": u.raw_label, "speaker": u.speaker, "session": u.session}
        for u in read_iemocap(tree)
    ]
    tsv = tmp_path / "corpus.tsv"
    pd.DataFrame(rows).to_csv(tsv, sep="\t", index=False)
    manifest, _ = build_manifest(user_manifest_candidates(tsv), CLASSES, MERGE)
    assert len(manifest) == len(build_manifest(iemocap_candidates(tree), CLASSES, MERGE)[0])
    pd.DataFrame(rows).drop(columns="speaker").to_csv(tsv, sep="\t", index=False)
    with pytest.raises(CorpusError, match=r"corpus.tsv:1: header lacks column\(s\) speaker"):
        user_manifest_candidates(tsv)


def test_folds_invariants(tree):
    manifest, _ = build_manifest(iemocap_candidates(tree), CLASSES, MERGE)
    for dev in ("next_session", "previous_session"):
        folds = leave_one_session_out(manifest, dev)
        tests = folds[folds.split == "test"]
        # every utterance is test in exactly one fold
        assert sorted(tests.utt_id) == sorted(manifest.utt_id)
        assert tests.groupby("utt_id").size().eq(1).all()
        speakers = folds.merge(manifest[["utt_id", "speaker", "session"]], on="utt_id")
        for fold, group in speakers.groupby("fold"):
            per_speaker = group.groupby("speaker")["split"].nunique()
            assert per_speaker.eq(1).all(), f"fold {fold}: a speaker is in two splits"
            assert set(group.split) == {"train", "dev", "test"}
            assert set(group[group.split == "test"].session) == {str(fold)}
    with pytest.raises(CorpusError, match="folds.dev"):
        leave_one_session_out(manifest, "random")
