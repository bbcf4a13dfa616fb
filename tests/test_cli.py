import pandas as pd
import soundfile as sf

from serlens.cli import main
from serlens.corpus.espeak import synthesize


def test_corpus_steps_by_hand(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    assert (
        main(["synth-corpus", "--out", str(corpus), "--utterances-per-speaker", "4", "--seed", "3"])
        == 0
    )
    manifest = tmp_path / "m" / "manifest.tsv"
    assert main(["manifest", str(corpus), "--kind", "synthetic", "--out", str(manifest)]) == 0
    table = pd.read_csv(manifest, sep="\t")
    assert len(table) == 50 and table.speaker.nunique() == 10
    summary = pd.read_csv(manifest.with_name("summary.tsv"), sep="\t")
    assert summary.query("status != 'kept'")["n"].sum() == 20  # fru and xxx, counted
    folds = tmp_path / "m" / "folds.tsv"
    assert main(["folds", str(manifest), "--out", str(folds)]) == 0
    assert pd.read_csv(folds, sep="\t").query("split == 'test'").utt_id.is_unique


def test_transcribe_command(tmp_path, capsys):
    audio, rate = synthesize("Good morning. How are you doing today?")
    wav = tmp_path / "hello.wav"
    sf.write(wav, audio, rate)
    assert main(["transcribe", "--resources", str(tmp_path / "resources"), str(wav)]) == 0
    words = capsys.readouterr().out.lower()
    assert "good morning" in words and "today" in words


def test_errors_are_one_line_not_a_traceback(tmp_path, capsys):
    assert (
        main(
            [
                "manifest",
                str(tmp_path / "nowhere"),
                "--kind",
                "iemocap",
                "--out",
                str(tmp_path / "m.tsv"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("serlens: error:") and "no Session* folders" in err
