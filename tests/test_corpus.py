import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from iemocap_tree import SCRIPT, tone, write_tree

from serlens.corpus.folds import leave_one_session_out
from serlens.corpus.iemocap import (
    emo_evaluation_files,
    normalise_text,
    parse_emo_evaluation,
    read_iemocap,
)
from serlens.corpus.manifest import (
    MANIFEST_COLUMNS,
    build_manifest,
    iemocap_candidates,
    map_label,
    read_manifest,
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
        "item",
        "split",
    ]
    assert (manifest["split"] == "").all()  # IEMOCAP has no split of its own
    assert manifest["duration_s"].between(0.9, 2.0).all()
    assert (manifest["item"] == "").all()  # improvised dialogs only: no recurring item


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


@pytest.fixture()
def scripted_tree(tmp_path):
    return write_tree(tmp_path / "IEMOCAP_full_release", per_session=4, script_lines=3)


def test_scripted_lines_are_items_recovered_from_the_transcriptions(scripted_tree):
    utterances = read_iemocap(scripted_tree)
    scripted = [u for u in utterances if "_script" in u.utt_id]
    assert len(scripted) == 5 * 2 * 3
    assert all(u.item == "" for u in utterances if "_impro" in u.utt_id)
    # the same line is the same item in every session and speaker, however it was transcribed
    expected = {normalise_text(line) for line in SCRIPT[:3]}
    assert {u.item for u in scripted} == expected
    for item in expected:
        assert len({u.speaker for u in scripted if u.item == item}) == 10
    line0 = {u.item for u in scripted if u.utt_id.endswith("000")}
    assert line0 == {"what's he going to say"}  # "WHAT'S HE GOING TO SAY [LAUGHTER]?" too


def test_without_a_transcription_the_item_is_script_and_turn(scripted_tree):
    (scripted_tree / "Session2/dialog/transcriptions/Ses02M_script01_1.txt").unlink()
    items = {u.utt_id: u.item for u in read_iemocap(scripted_tree)}
    assert items["Ses02M_script01_1_F001"] == "script01_1/F001"
    assert items["Ses01M_script01_1_F001"] == normalise_text(SCRIPT[1])
    assert items["Ses02F_impro01_F000"] == ""


def test_items_reach_the_manifest_and_old_manifests_still_read(scripted_tree, tmp_path):
    manifest, _ = build_manifest(iemocap_candidates(scripted_tree), CLASSES, MERGE)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert set(manifest["item"]) - {""} <= {normalise_text(line) for line in SCRIPT}
    path = tmp_path / "manifest.tsv"
    manifest.to_csv(path, sep="\t", index=False)
    assert read_manifest(path)["item"].tolist() == manifest["item"].tolist()
    manifest.drop(columns="item").to_csv(path, sep="\t", index=False)
    assert (read_manifest(path)["item"] == "").all()  # no column: no recurring item


def test_normalised_text():
    assert normalise_text("Okay, [BREATHING] I'm  here!") == "okay i'm here"
    assert normalise_text("  WHAT'S he going to say [LAUGHTER]?") == "what's he going to say"
    assert normalise_text("[LAUGHTER]") == ""


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
    with_items = pd.DataFrame(rows).assign(item=["t1", ""] * (len(rows) // 2))
    with_items.to_csv(tsv, sep="\t", index=False)
    assert [c.item for c in user_manifest_candidates(tsv)] == list(with_items["item"])


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
