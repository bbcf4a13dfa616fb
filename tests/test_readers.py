"""RAVDESS, CREMA-D and MSP-Podcast readers, on trees written in each corpus's own naming."""

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from serlens.corpus import cremad, msp_podcast, ravdess
from serlens.corpus.manifest import build_manifest
from serlens.errors import ConfigError, CorpusError

CLASSES = ["neu", "hap", "ang", "sad"]


def tone(path: Path, seconds: float = 0.5, rate: int = 16000, pitch: float = 220.0) -> None:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.2 * np.sin(2 * np.pi * pitch * t)).astype(np.float32), rate)


def touch(path: Path, audio: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if audio:
        tone(path)
    else:
        path.write_bytes(b"")
    return path


# --------------------------------------------------------------------------- RAVDESS


def ravdess_name(
    emotion="01",
    actor="01",
    channel="01",
    statement="01",
    modality="03",
    intensity="01",
    repetition="01",
):
    return f"{modality}-{channel}-{emotion}-{intensity}-{statement}-{repetition}-{actor}.wav"


def write_ravdess(root: Path, actors=("01", "02"), songs: int = 0, audio: bool = False) -> Path:
    """Per actor: every emotion once for statement 01, neutral again for statement 02, and
    ``songs`` song files."""
    for actor in actors:
        folder = root / f"Actor_{actor}"
        for emotion in ravdess.EMOTIONS:
            touch(folder / ravdess_name(emotion, actor), audio)
        touch(folder / ravdess_name("01", actor, statement="02", repetition="02"), audio)
        for k in range(songs):
            touch(folder / ravdess_name("03", actor, channel="02", repetition=f"0{k + 1}"), audio)
    return root


def test_ravdess_labels_speakers_and_items(tmp_path):
    root = write_ravdess(tmp_path / "ravdess", actors=("01", "02", "23", "24"))
    candidates = ravdess.read(root, {})
    assert len(candidates) == 4 * 9
    by_id = {c.utt_id: c for c in candidates}
    for code, label in [
        ("01", "neu"),
        ("02", "cal"),
        ("03", "hap"),
        ("04", "sad"),
        ("05", "ang"),
        ("06", "fea"),
        ("07", "dis"),
        ("08", "sur"),
    ]:
        assert by_id[f"03-01-{code}-01-01-01-23"].raw_label == label
    c = by_id["03-01-01-01-02-02-24"]
    assert (c.speaker, c.gender, c.item, c.session) == ("24", "F", "02", "")
    assert c.path == root / "Actor_24" / "03-01-01-01-02-02-24.wav" and c.where == str(c.path)
    assert {c.item for c in candidates} == {"01", "02"}
    assert ravdess.speakers(root, {}) == {"01": "M", "02": "F", "23": "M", "24": "F"}


def test_ravdess_song_and_other_files_are_left_out_and_counted(tmp_path, caplog):
    root = write_ravdess(tmp_path / "ravdess", songs=2)
    touch(root / "Actor_01" / "01-01-01-01-01-01-01.mp4")
    touch(root / "Actor_02" / "._03-01-01-01-01-01-02.wav")
    with caplog.at_level(logging.INFO, logger="serlens.corpus.ravdess"):
        candidates = ravdess.read(root, {})
    assert len(candidates) == 2 * 9
    assert all(c.utt_id.split("-")[1] == "01" for c in candidates)
    assert ravdess.skipped(root, {}) == {
        ravdess.SONG: 4,
        ravdess.NOT_WAV: 1,
        ravdess.RESOURCE_FORK: 1,
    }
    assert "4 file(s) left out: song (vocal channel 02)" in caplog.text


def test_ravdess_without_song_skips_nothing(tmp_path):
    assert ravdess.skipped(write_ravdess(tmp_path / "r"), {}) == {}


@pytest.mark.parametrize(
    "name, message",
    [
        ("03-01-01-01-01-01.wav", "not a RAVDESS file name"),  # six fields
        ("3-01-01-01-01-01-01.wav", "not a RAVDESS file name"),
        ("03-01-09-01-01-01-01.wav", "emotion code '09'"),
        ("03-03-01-01-01-01-01.wav", "channel code '03'"),
        ("03-01-01-03-01-01-01.wav", "intensity code '03'"),
        ("03-01-01-01-03-01-01.wav", "statement code '03'"),
        ("03-01-01-01-01-03-01.wav", "repetition code '03'"),
        ("04-01-01-01-01-01-01.wav", "modality code '04'"),
        ("01-01-01-01-01-01-01.wav", "modality 01 .full-AV. in a .wav"),
    ],
)
def test_ravdess_malformed_names_name_the_file(tmp_path, name, message):
    root = write_ravdess(tmp_path / "ravdess", actors=("01",))
    bad = touch(root / "Actor_01" / name)
    with pytest.raises(CorpusError, match=message) as error:
        ravdess.read(root, {})
    assert str(bad) in str(error.value) and "e.g. 03-01-06-01-02-01-12.wav" in str(error.value)


def test_ravdess_actor_must_match_its_folder(tmp_path):
    root = write_ravdess(tmp_path / "ravdess", actors=("01", "02"))
    stray = touch(root / "Actor_01" / ravdess_name("05", "02", repetition="02"))
    with pytest.raises(CorpusError, match="actor 02 but the file is in folder Actor_01") as error:
        ravdess.read(root, {})
    assert str(stray) in str(error.value)


def test_ravdess_bad_folders(tmp_path):
    with pytest.raises(CorpusError, match="no such folder; corpus.root must be the RAVDESS"):
        ravdess.read(tmp_path / "nowhere", {})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no Actor_XX folders"):
        ravdess.speakers(tmp_path / "empty", {})
    root = write_ravdess(tmp_path / "r")
    (root / "Actor_25").mkdir()
    with pytest.raises(CorpusError, match="Actor_25: not a RAVDESS actor folder"):
        ravdess.read(root, {})


def test_ravdess_song_only_tree_is_an_error(tmp_path):
    root = tmp_path / "song"
    touch(root / "Actor_01" / ravdess_name("03", "01", channel="02"))
    with pytest.raises(CorpusError, match="no speech files"):
        ravdess.read(root, {})


def test_ravdess_duplicate_utterance_is_an_error(tmp_path):
    root = write_ravdess(tmp_path / "r", actors=("01",))
    touch(root / "Actor_01" / ravdess_name("05", "01").replace(".wav", ".WAV"))
    with pytest.raises(CorpusError, match="occurs twice"):
        ravdess.read(root, {})


def test_ravdess_candidates_build_a_manifest(tmp_path):
    root = write_ravdess(tmp_path / "ravdess", songs=1, audio=True)
    manifest, summary = build_manifest(ravdess.read(root, {}), CLASSES, {})
    assert len(manifest) == 2 * 5  # neu twice, hap, sad, ang per actor
    assert sorted(manifest["label"].unique()) == sorted(CLASSES)
    assert set(manifest["gender"]) == {"M", "F"} and set(manifest["item"]) == {"01", "02"}
    # 0.5 s tones; a sine starting at 0 has one exact zero, which is not audio
    assert np.allclose(manifest["duration_s"], 0.5, atol=1e-3)
    dropped = summary[summary["status"].str.startswith("dropped")]
    assert set(dropped["raw_label"]) == {"cal", "fea", "dis", "sur"}
    assert dropped["n"].sum() == 8


# --------------------------------------------------------------------------- CREMA-D

DEMOGRAPHICS = (
    '"ActorID","Age","Sex","Race","Ethnicity"\n'
    '1001,51,"Male","Caucasian","Not Hispanic"\n'
    '1002,21,"Female","Caucasian","Not Hispanic"\n'
    '1091,29,"Female","Asian","Not Hispanic"\n'
)
SUMMARY_HEADER = (
    '"","FileName","VoiceVote","VoiceLevel","FaceVote","FaceLevel","MultiModalVote",'
    '"MultiModalLevel"\n'
)


def write_cremad(root: Path, audio: bool = False, demographics: bool = True) -> Path:
    """Actors 1001, 1002, 1091: every emotion on IEO at one level, and NEU on every sentence."""
    wav = root / "AudioWAV"
    for actor in ("1001", "1002", "1091"):
        for emotion, level in zip(
            cremad.EMOTIONS, ["LO", "MD", "HI", "XX", "HI", "LO"], strict=True
        ):
            touch(wav / f"{actor}_IEO_{emotion}_{level}.wav", audio)
        for sentence in cremad.SENTENCES:
            if sentence != "IEO":
                touch(wav / f"{actor}_{sentence}_NEU_XX.wav", audio)
    if demographics:
        (root / "VideoDemographics.csv").write_text(DEMOGRAPHICS, encoding="utf-8")
    return root


def write_summary(root: Path, votes: dict[str, str] | None = None) -> Path:
    """A summaryTable.csv row for every clip of AudioWAV: vote ``votes[stem]``, else the
    intended emotion's letter."""
    votes = votes or {}
    lines = [SUMMARY_HEADER]
    for k, path in enumerate(sorted((root / "AudioWAV").glob("*.wav")), start=1):
        vote = votes.get(path.stem, path.stem.split("_")[2][0])
        lines.append(f'"{k}","{path.stem}","{vote}","60","N","50","N","55"\n')
    table = root / "processedResults" / "summaryTable.csv"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text("".join(lines), encoding="utf-8")
    return table


def test_cremad_intended_labels_genders_and_items(tmp_path):
    root = write_cremad(tmp_path / "crema")
    candidates = cremad.read(root, {})
    assert len(candidates) == 3 * 17
    by_id = {c.utt_id: c for c in candidates}
    for code, label in [
        ("ANG", "ang"),
        ("DIS", "dis"),
        ("FEA", "fea"),
        ("HAP", "hap"),
        ("NEU", "neu"),
        ("SAD", "sad"),
    ]:
        (c,) = [c for c in candidates if c.utt_id.startswith(f"1002_IEO_{code}_")]
        assert c.raw_label == label and c.where == str(c.path)
    c = by_id["1091_WSI_NEU_XX"]
    assert (c.speaker, c.gender, c.item, c.session) == ("1091", "F", "WSI", "")
    assert c.path == root / "AudioWAV" / "1091_WSI_NEU_XX.wav"
    assert {c.item for c in candidates} == set(cremad.SENTENCES)
    assert cremad.speakers(root, {}) == {"1001": "M", "1002": "F", "1091": "F"}
    assert cremad.skipped(root, {}) == {}


def test_cremad_without_demographics_has_unknown_gender(tmp_path):
    root = write_cremad(tmp_path / "crema", demographics=False)
    assert {c.gender for c in cremad.read(root, {})} == {"NA"}
    assert cremad.speakers(root, {}) == {"1001": "NA", "1002": "NA", "1091": "NA"}


def test_cremad_demographics_must_cover_the_actors_and_have_its_columns(tmp_path):
    root = write_cremad(tmp_path / "crema")
    demo = root / "VideoDemographics.csv"
    demo.write_text(DEMOGRAPHICS.rsplit("1091", 1)[0], encoding="utf-8")
    with pytest.raises(CorpusError, match=r"lacks actor\(s\) \['1091'\]"):
        cremad.speakers(root, {})
    demo.write_text('"ActorID","Age","Gender"\n1001,51,"Male"\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"VideoDemographics.csv:1: header lacks column\(s\) Sex"):
        cremad.read(root, {})
    demo.write_text('"ActorID","Sex"\n1001,"M"\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"VideoDemographics.csv:2: Sex 'M'"):
        cremad.read(root, {})


def test_cremad_perceived_labels_from_the_voice_votes(tmp_path):
    root = write_cremad(tmp_path / "crema")
    table = write_summary(
        root,
        {
            "1001_IEO_ANG_LO": "A:F",  # tie
            "1001_IEO_HAP_XX": "",  # no vote
            "1002_IEO_SAD_LO": "N",  # heard as neutral
            "1091_TIE_NEU_XX": "S",
            "1091_DFA_NEU_XX": "H:H",
        },
    )
    settings = {"cremad": {"labels": "perceived"}}
    by_id = {c.utt_id: c for c in cremad.read(root, settings)}
    assert by_id["1001_IEO_ANG_LO"].raw_label == "xxx"
    assert by_id["1001_IEO_HAP_XX"].raw_label == "xxx"
    assert by_id["1002_IEO_SAD_LO"].raw_label == "neu"
    assert by_id["1091_TIE_NEU_XX"].raw_label == "sad"
    assert by_id["1091_DFA_NEU_XX"].raw_label == "hap"
    for letter, label in cremad.VOTES.items():  # the votes that agree with the intended emotion
        (c,) = [c for c in by_id.values() if c.utt_id.startswith(f"1002_IEO_{letter}")]
        if c.utt_id != "1002_IEO_SAD_LO":
            assert c.raw_label == label
    lines = table.read_text().splitlines()
    where = by_id["1002_IEO_SAD_LO"].where
    assert where.startswith(f"{table}:")
    assert '"1002_IEO_SAD_LO"' in lines[int(where.rsplit(":", 1)[1]) - 1]
    # the intended labels are unchanged by the table's presence
    assert {c.utt_id: c.raw_label for c in cremad.read(root, {})}["1002_IEO_SAD_LO"] == "sad"


def test_cremad_perceived_without_the_table_is_an_error(tmp_path):
    root = write_cremad(tmp_path / "crema")
    with pytest.raises(CorpusError) as error:
        cremad.read(root, {"cremad": {"labels": "perceived"}})
    message = str(error.value)
    assert str(root / "processedResults" / "summaryTable.csv") in message
    assert "corpus.cremad.labels" in message and "perceived" in message
    with pytest.raises(ConfigError, match="corpus.cremad.labels: 'crowd'"):
        cremad.read(root, {"cremad": {"labels": "crowd"}})


def test_cremad_summary_table_problems(tmp_path):
    root = write_cremad(tmp_path / "crema")
    settings = {"cremad": {"labels": "perceived"}}
    table = write_summary(root, {"1001_IEO_ANG_LO": "A:Q"})
    with pytest.raises(CorpusError, match=r"summaryTable.csv:\d+: VoiceVote 'A:Q'"):
        cremad.read(root, settings)
    table.write_text('"","FileName","FaceVote"\n"1","1001_IEO_ANG_LO","A"\n')
    with pytest.raises(
        CorpusError, match=r"summaryTable.csv:1: header lacks column\(s\) VoiceVote"
    ):
        cremad.read(root, settings)
    write_summary(root)
    lines = table.read_text().splitlines(keepends=True)
    table.write_text("".join(line for line in lines if "1091_WSI_NEU_XX" not in line))
    with pytest.raises(CorpusError, match="has no row for 1091_WSI_NEU_XX.wav"):
        cremad.read(root, settings)


@pytest.mark.parametrize(
    "name, message",
    [
        ("1001_IEO_ANG.wav", "not a CREMA-D file name"),
        ("1001-IEO-ANG-LO.wav", "not a CREMA-D file name"),
        ("1092_IEO_ANG_LO.wav", "actor 1092 is outside"),
        ("1001_XYZ_ANG_LO.wav", "sentence code 'XYZ'"),
        ("1001_IEO_SUR_LO.wav", "emotion code 'SUR'"),
        ("1001_IEO_ANG_ZZ.wav", "level code 'ZZ'"),
    ],
)
def test_cremad_malformed_names_name_the_file(tmp_path, name, message):
    root = write_cremad(tmp_path / "crema")
    bad = touch(root / "AudioWAV" / name)
    with pytest.raises(CorpusError, match=message) as error:
        cremad.read(root, {})
    assert str(bad) in str(error.value) and "e.g. 1001_DFA_ANG_XX.wav" in str(error.value)


def test_cremad_missing_folders_and_extra_files(tmp_path):
    with pytest.raises(CorpusError, match="no such folder; corpus.root must be the CREMA-D"):
        cremad.read(tmp_path / "nowhere", {})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no AudioWAV/ folder"):
        cremad.speakers(tmp_path / "empty", {})
    root = write_cremad(tmp_path / "crema")
    touch(root / "AudioWAV" / "1001_IEO_ANG_LO.mp3")
    touch(root / "AudioWAV" / "._1001_IEO_ANG_LO.wav")
    assert cremad.skipped(root, {}) == {cremad.NOT_WAV: 1, cremad.RESOURCE_FORK: 1}
    assert len(cremad.read(root, {})) == 3 * 17
    touch(root / "AudioWAV" / "1001_IEO_ANG_LO.WAV")
    with pytest.raises(CorpusError, match=r"\['1001_IEO_ANG_LO'\] occur more than once"):
        cremad.read(root, {})


def test_cremad_perceived_candidates_build_a_manifest(tmp_path):
    root = write_cremad(tmp_path / "crema", audio=True)
    write_summary(root, {"1001_IEO_ANG_LO": "A:F", "1002_IEO_SAD_LO": "N"})
    candidates = cremad.read(root, {"cremad": {"labels": "perceived"}})
    manifest, summary = build_manifest(candidates, CLASSES, {})
    labels = manifest.set_index("utt_id")["label"]
    assert "1001_IEO_ANG_LO" not in labels and labels["1002_IEO_SAD_LO"] == "neu"
    assert len(manifest) == 3 * 15 - 1
    assert set(manifest["speaker"]) == {"1001", "1002", "1091"}
    xxx = summary[summary["raw_label"] == "xxx"]
    assert xxx["n"].sum() == 1 and xxx["status"].iloc[0].startswith("dropped")


# --------------------------------------------------------------------------- MSP-Podcast

MSP_COLUMNS = [
    "FileName",
    "EmoClass",
    "EmoAct",
    "EmoVal",
    "EmoDom",
    "SpkrID",
    "Gender",
    "Split_Set",
]


def write_msp(root: Path, rows: list[tuple], audio: bool = False, columns=MSP_COLUMNS) -> Path:
    """``rows``: (FileName, EmoClass, SpkrID, Gender, Split_Set)."""
    labels = root / "Labels" / "labels_consensus.csv"
    labels.parent.mkdir(parents=True)
    (root / "Audios").mkdir()
    with labels.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for name, emo, spk, gender, split in rows:
            full = dict(
                FileName=name,
                EmoClass=emo,
                EmoAct="4.2",
                EmoVal="3.8",
                EmoDom="4.0",
                SpkrID=spk,
                Gender=gender,
                Split_Set=split,
            )
            writer.writerow([full[c] for c in columns])
            if audio and split in msp_podcast.SPLITS:
                tone(root / "Audios" / name)
    return root


def msp_rows() -> list[tuple]:
    rows = []
    for k, emo in enumerate(msp_podcast.EMOTIONS, start=1):
        rows.append((f"MSP-PODCAST_0001_{k:04d}.wav", emo, "127", "Male", "Train"))
    rows += [
        ("MSP-PODCAST_0002_0001.wav", "H", "Unknown", "Unknown", "Train"),
        ("MSP-PODCAST_0002_0002.wav", "S", "Unknown", "Female", "Development"),
        ("MSP-PODCAST_0003_0001.wav", "A", "45", "Female", "Development"),
        ("MSP-PODCAST_0004_0001.wav", "N", "9", "Female", "Test1"),
        ("MSP-PODCAST_0004_0002_0001.wav", "S", "9", "Female", "Test1"),
        ("MSP-PODCAST_0005_0001.wav", "N", "300", "Male", "Test2"),
        ("MSP-PODCAST_0005_0002.wav", "A", "300", "Male", "Test2"),
        ("MSP-PODCAST_0006_0001.wav", "", "Unknown", "Unknown", "Test3"),
    ]
    return rows


def test_msp_labels_splits_and_speakers(tmp_path):
    root = write_msp(tmp_path / "msp", msp_rows())
    candidates = msp_podcast.read(root, {})
    assert len(candidates) == 10 + 5
    by_id = {c.utt_id: c for c in candidates}
    expected = dict(
        zip(
            "NHASFDUCOX",
            ["neu", "hap", "ang", "sad", "fea", "dis", "sur", "con", "oth", "xxx"],
            strict=True,
        )
    )
    for k, emo in enumerate(msp_podcast.EMOTIONS, start=1):
        assert by_id[f"MSP-PODCAST_0001_{k:04d}"].raw_label == expected[emo]
    assert {c.split for c in candidates if c.speaker == "127"} == {"train"}
    assert by_id["MSP-PODCAST_0003_0001"].split == "dev"
    assert by_id["MSP-PODCAST_0004_0002_0001"].split == "test"
    c = by_id["MSP-PODCAST_0004_0001"]
    assert (c.speaker, c.gender, c.session, c.item) == ("9", "F", "", "")
    assert c.path == root / "Audios" / "MSP-PODCAST_0004_0001.wav"
    labels = root / "Labels" / "labels_consensus.csv"
    assert c.where == f"{labels}:{10 + 4 + 1}"
    assert not any(
        c.utt_id.startswith(("MSP-PODCAST_0005", "MSP-PODCAST_0006")) for c in candidates
    )
    assert msp_podcast.speakers(root, {}) == {
        "127": "M",
        "unknown:MSP-PODCAST_0002_0001": "NA",
        "unknown:MSP-PODCAST_0002_0002": "F",
        "45": "F",
        "9": "F",
    }


def test_msp_unknown_speakers_are_each_their_own(tmp_path):
    rows = [(f"MSP-PODCAST_0010_{k:04d}.wav", "N", "Unknown", "Male", "Train") for k in range(1, 6)]
    root = write_msp(tmp_path / "msp", rows)
    speakers = [c.speaker for c in msp_podcast.read(root, {})]
    assert len(set(speakers)) == 5
    assert speakers[0] == "unknown:MSP-PODCAST_0010_0001"


def test_msp_other_test_sets_are_counted(tmp_path, caplog):
    root = write_msp(tmp_path / "msp", msp_rows())
    assert msp_podcast.skipped(root, {}) == {
        msp_podcast.skip_reason("Test2"): 2,
        msp_podcast.skip_reason("Test3"): 1,
    }
    with caplog.at_level(logging.INFO, logger="serlens.corpus.msp_podcast"):
        msp_podcast.read(root, {})
    assert "2 segment(s) left out: split Test2" in caplog.text


def test_msp_disagreeing_gender_is_na(tmp_path):
    rows = [
        ("MSP-PODCAST_0001_0001.wav", "N", "7", "Male", "Train"),
        ("MSP-PODCAST_0001_0002.wav", "N", "7", "Female", "Train"),
        ("MSP-PODCAST_0001_0003.wav", "N", "8", "Unknown", "Train"),
        ("MSP-PODCAST_0001_0004.wav", "N", "8", "Female", "Train"),
    ]
    root = write_msp(tmp_path / "msp", rows)
    assert msp_podcast.speakers(root, {}) == {"7": "NA", "8": "F"}
    assert [c.gender for c in msp_podcast.read(root, {})] == ["NA", "NA", "F", "F"]


@pytest.mark.parametrize(
    "row, message",
    [
        (("MSP-PODCAST_0001_0001.wav", "Z", "1", "Male", "Train"), "EmoClass 'Z'"),
        (("MSP-PODCAST_0001_0001.wav", "N", "1", "Male", "Validation"), "Split_Set 'Validation'"),
        (("podcast_1.wav", "N", "1", "Male", "Train"), "FileName 'podcast_1.wav'"),
        (("MSP-PODCAST_0001_0001.wav", "N", "", "Male", "Train"), "empty SpkrID"),
    ],
)
def test_msp_bad_rows_name_the_line(tmp_path, row, message):
    good = ("MSP-PODCAST_0009_0001.wav", "N", "1", "Male", "Train")
    root = write_msp(tmp_path / "msp", [good, row])
    with pytest.raises(CorpusError, match=message) as error:
        msp_podcast.read(root, {})
    assert f"{root / 'Labels' / 'labels_consensus.csv'}:3" in str(error.value)


def test_msp_duplicates_missing_columns_and_folders(tmp_path):
    row = ("MSP-PODCAST_0001_0001.wav", "N", "1", "Male", "Train")
    root = write_msp(tmp_path / "dup", [row, row])
    with pytest.raises(CorpusError, match="listed twice .first at line 2."):
        msp_podcast.read(root, {})
    columns = [c for c in MSP_COLUMNS if c not in ("SpkrID", "Split_Set")]
    root = write_msp(tmp_path / "cols", [], columns=columns)
    with pytest.raises(
        CorpusError, match=r"labels_consensus.csv:1: header lacks column\(s\) SpkrID, Split_Set"
    ):
        msp_podcast.speakers(root, {})
    with pytest.raises(CorpusError, match="no such folder; corpus.root must be the MSP-Podcast"):
        msp_podcast.read(tmp_path / "nowhere", {})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match=r"labels_consensus.csv: missing; corpus.root must be"):
        msp_podcast.read(tmp_path / "empty", {})
    root = write_msp(tmp_path / "noaudio", [row])
    (root / "Audios").rmdir()
    with pytest.raises(CorpusError, match=r"Audios: missing"):
        msp_podcast.read(root, {})
    root = write_msp(tmp_path / "test2only", [row[:4] + ("Test2",)])
    with pytest.raises(CorpusError, match="no Train, Development or Test1 rows"):
        msp_podcast.read(root, {})


def test_msp_candidates_build_a_manifest_with_their_split(tmp_path):
    root = write_msp(tmp_path / "msp", msp_rows(), audio=True)
    manifest, summary = build_manifest(msp_podcast.read(root, {}), CLASSES, {})
    assert len(manifest) == 4 + 5  # N H A S of speaker 127, and the five others kept
    assert manifest["speaker"].str.startswith("unknown:").sum() == 2
    dropped = summary[summary["status"].str.startswith("dropped")]
    assert set(dropped["raw_label"]) == {"fea", "dis", "sur", "con", "oth", "xxx"}
