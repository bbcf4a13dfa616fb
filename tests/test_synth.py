"""eSpeak NG driver and the synthetic IEMOCAP-layout corpus."""

from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from serlens.corpus.espeak import available_variants, synthesize
from serlens.corpus.iemocap import normalise_text, read_iemocap
from serlens.corpus.synth import (
    EXTRA_LABELS,
    MAX_SECONDS,
    MIN_SECONDS,
    SCRIPTED_FRACTION,
    SESSION_VOICES,
    SYNTH_CLASSES,
    _plan,
    n_script_lines,
    write_synthetic_corpus,
)

UPS = 4  # utterances per speaker: keeps the suite fast
LINE = re.compile(r"^\[(\d+\.\d{4}) - (\d+\.\d{4})\]\t(\S+)\t(\w+)\t\[[\d., ]+\]$")


def _parse_emo(root: Path) -> dict[str, tuple[str, float, float]]:
    """utt_id -> (label, start, end) from the top-level EmoEvaluation files only."""
    out = {}
    for f in sorted(root.glob("Session*/dialog/EmoEvaluation/*.txt")):
        if f.name.startswith("._"):
            continue
        for line in f.read_text().splitlines():
            m = LINE.match(line)
            if m:
                out[m[3]] = (m[4], float(m[1]), float(m[2]))
    return out


def _wav_path(root: Path, utt_id: str) -> Path:
    dialog = utt_id.rsplit("_", 1)[0]
    return root / f"Session{int(utt_id[3:5])}" / "sentences" / "wav" / dialog / f"{utt_id}.wav"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "IEMOCAP_full_release"
    assert write_synthetic_corpus(root, utterances_per_speaker=UPS, seed=0) == root
    return root


def test_synthesize_returns_audio():
    y, sr = synthesize("The teacher opened the window.", variant="f3", pitch=60, rate=200)
    assert y.dtype == np.float32 and y.ndim == 1
    assert sr > 8000
    assert 0.5 < len(y) / sr < 5.0
    assert 0.05 < np.abs(y).max() <= 1.0
    assert np.sqrt(np.mean(y**2)) > 0.01


def test_synthesize_is_a_function_of_its_arguments():
    kw = dict(voice="en-us+f2", pitch=40, pitch_range=70, rate=150, seed=5)  # breathy variant
    a, _ = synthesize("My aunt fixed the lamp.", **kw)
    synthesize("Something else in between.", variant="m3", rate=300)
    b, _ = synthesize("My aunt fixed the lamp.", **kw)
    np.testing.assert_array_equal(a, b)
    slow, _ = synthesize("My aunt fixed the lamp.", **{**kw, "rate": 100})
    assert len(slow) > len(a)


def test_synthesize_rejects_bad_arguments():
    assert {"f1", "m7"} <= set(available_variants())
    with pytest.raises(ValueError, match="variant"):
        synthesize("hello", variant="nonexistent")  # eSpeak itself would ignore it silently
    with pytest.raises(ValueError, match="voice"):
        synthesize("hello", voice="xx-nonexistent")
    with pytest.raises(ValueError, match="pitch"):
        synthesize("hello", pitch=101)
    with pytest.raises(ValueError):
        synthesize("   ")


def test_layout(corpus: Path):
    assert sorted(p.name for p in corpus.glob("Session*")) == [f"Session{n}" for n in range(1, 6)]
    for n in range(1, 6):
        emo = corpus / f"Session{n}" / "dialog" / "EmoEvaluation"
        dialogs = sorted(p.stem for p in emo.glob("Ses*.txt"))
        assert len(dialogs) >= 2
        assert any("_impro" in d for d in dialogs) and any("_script" in d for d in dialogs)
        for sub in ("Categorical", "Attribute", "Self-evaluation"):
            assert list((emo / sub).glob("*.txt")), sub
        transcriptions = corpus / f"Session{n}" / "dialog" / "transcriptions"
        assert sorted(p.stem for p in transcriptions.glob("*.txt")) == dialogs
        junk = list(emo.glob("._*.txt"))
        assert len(junk) == 1
        with pytest.raises(UnicodeDecodeError):
            junk[0].read_bytes().decode("utf-8")
        for d in dialogs:
            assert d.startswith(f"Ses{n:02d}")
            assert (corpus / f"Session{n}" / "sentences" / "wav" / d).is_dir()
            text = (emo / f"{d}.txt").read_text()
            assert text.startswith("% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n")
            ids = re.findall(rf"\t({d}_[FM]\d{{3}})\t", text)
            assert {i[-4] for i in ids} == {"F", "M"}  # both speakers in every dialog
    assert not list(corpus.parent.glob(".*partial*"))  # temp dir renamed away


def test_emoevaluation_blocks(corpus: Path):
    f = next(corpus.glob("Session1/dialog/EmoEvaluation/Ses01F_impro01.txt"))
    blocks = f.read_text().split("\n\n")[1:-1]
    assert blocks
    prev_end = 0.0
    for block in blocks:
        first, *evals = block.split("\n")
        m = LINE.match(first)
        assert m, first
        start, end = float(m[1]), float(m[2])
        assert prev_end < start < end
        prev_end = end
        assert any(re.match(r"^C-E\d:\t[\w ]+;\t\(\)$", e) for e in evals)
        assert any(re.match(r"^A-E\d:\tval \d; act \d; dom  \d;\t\(\)$", e) for e in evals)


def test_every_utterance_has_a_16k_mono_wav(corpus: Path):
    emo = _parse_emo(corpus)
    assert len(emo) == 5 * 2 * (UPS + len(EXTRA_LABELS))
    wavs = {p.stem for p in corpus.glob("Session*/sentences/wav/*/*.wav")}
    assert wavs == set(emo)
    for utt_id, (_, start, end) in emo.items():
        info = sf.info(_wav_path(corpus, utt_id))
        assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
        assert MIN_SECONDS - 1e-3 <= info.duration <= MAX_SECONDS + 1e-3
        assert abs((end - start) - info.duration) < 1e-3
    y, _ = sf.read(_wav_path(corpus, next(iter(emo))))
    assert np.abs(y).max() > 0.02


def test_labels(corpus: Path):
    labels = [lab for lab, _, _ in _parse_emo(corpus).values()]
    assert set(labels) == set(SYNTH_CLASSES) | set(EXTRA_LABELS)
    counts = {c: labels.count(c) for c in SYNTH_CLASSES}
    assert len(set(counts.values())) == 1, counts  # balanced
    assert all(labels.count(x) == 10 for x in EXTRA_LABELS)  # one per speaker


def _synth_rows(root: Path) -> list[dict]:
    with open(root / "synth_manifest.tsv", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_the_iemocap_reader_recovers_the_script_lines_as_items(corpus: Path):
    rows = {r["utt_id"]: r for r in _synth_rows(corpus)}
    utterances = read_iemocap(corpus)
    assert len(utterances) == len(rows)
    n_lines = n_script_lines(UPS, SCRIPTED_FRACTION)
    assert n_lines == UPS // 2
    script = {normalise_text(r["text"]) for r in rows.values() if r["script_line"]}
    assert len(script) == n_lines  # a fixed list of sentences
    for u in utterances:
        row = rows[u.utt_id]
        if row["script_line"]:
            assert "_script" in u.utt_id and u.item == normalise_text(row["text"])
        else:
            assert "_impro" in u.utt_id and u.item == ""
    per_speaker = {}
    for u in utterances:
        per_speaker.setdefault(u.speaker, []).append(u.item)
    assert len(per_speaker) == 10
    for speaker, items in per_speaker.items():  # every speaker says every line, once
        assert sorted(i for i in items if i) == sorted(script), speaker
    emotions = {}
    for u in utterances:
        if u.item:
            emotions.setdefault(u.item, set()).add(u.raw_label)
    assert all(len(labels) > 1 for labels in emotions.values())  # in varied emotions


@pytest.mark.parametrize("ups", [4, 16, 21])
def test_plan_scripted_part_is_balanced_and_said_by_everyone(ups):
    dialogs, script = _plan(ups, seed=3)
    assert len(script) == len(set(script)) == n_script_lines(ups, SCRIPTED_FRACTION)
    utts = [u for d in dialogs for u in d]
    assert len(utts) == 10 * (ups + len(EXTRA_LABELS))  # the corpus keeps its size
    speakers = {(u.session, u.gender) for u in utts}
    for speaker in speakers:
        mine = [u for u in utts if (u.session, u.gender) == speaker]
        lines = sorted(u.script_line for u in mine if u.script_line is not None)
        assert lines == list(range(len(script)))
        counts = Counter(u.label for u in mine if u.script_line is not None)
        assert max(counts.values()) - min(counts.get(c, 0) for c in SYNTH_CLASSES) <= 1
        assert Counter(u.label for u in mine if u.label in SYNTH_CLASSES).keys() == set(
            SYNTH_CLASSES
        )
    for u in utts:
        assert (u.script_line is None) == ("_impro" in u.dialog)
        if u.script_line is None:
            assert u.text not in script
    none, _ = _plan(ups, seed=3, scripted_fraction=0.0)
    assert all("_impro" in d[0].dialog and d[0].script_line is None for d in none)
    with pytest.raises(ValueError, match="scripted_fraction"):
        write_synthetic_corpus(Path("/nonexistent/x"), scripted_fraction=1.5)


def test_speaker_gender_matches_voice(corpus: Path):
    with open(corpus / "synth_manifest.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert len({(r["session"], r["voice"]) for r in rows}) == 10
    for r in rows:
        gender = r["utt_id"].rsplit("_", 1)[1][0]
        assert r["gender"] == gender
        assert r["voice"] == SESSION_VOICES[int(r["session"])][gender]
        assert r["voice"].split("+")[1][0] == gender.lower()


def test_deterministic(corpus: Path, tmp_path: Path):
    again = write_synthetic_corpus(tmp_path / "same", utterances_per_speaker=UPS, seed=0)
    other = write_synthetic_corpus(tmp_path / "other", utterances_per_speaker=UPS, seed=1)
    rel = sorted(p.relative_to(corpus) for p in corpus.rglob("*") if p.is_file())
    assert rel == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for r in rel:
        assert _md5(corpus / r) == _md5(again / r), r
    emo = Path("Session2/dialog/EmoEvaluation/Ses02F_impro01.txt")
    assert (corpus / emo).read_text() != (other / emo).read_text()
    wav = _wav_path(Path(), "Ses01F_impro01_F000")
    assert _md5(corpus / wav) != _md5(other / wav)


def test_refuses_existing_root(corpus: Path):
    with pytest.raises(FileExistsError, match=str(corpus)):
        write_synthetic_corpus(corpus, utterances_per_speaker=UPS)
