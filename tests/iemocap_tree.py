"""Write a small tree in IEMOCAP_full_release's exact format (the tests' own data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
LABELS = ["neu", "hap", "ang", "sad", "exc", "fru", "xxx", "sur"]
#: The script every session performs (each line said by both speakers, in ``script01_1``).
SCRIPT = [
    "What's he going to say?",
    "I don't know, Annie.",
    "Well, it's been three years.",
    "Do you want me to go?",
]


def script_text(session: int, line: int) -> str:
    """How session ``session`` says script line ``line``: case, punctuation and non-speech marks
    vary between performances (normalised away by the reader)."""
    text = SCRIPT[line]
    if session == 2:
        return text.upper().replace("?", " [LAUGHTER]?")
    if session == 3:
        return text.replace(",", "").replace("?", "...?")
    return text


def tone(seconds: float, freq: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _utterance(session_dir, dialog, utt, label, start, seconds, freq, rate) -> str:
    wav_dir = session_dir / "sentences" / "wav" / dialog
    wav_dir.mkdir(parents=True, exist_ok=True)
    sf.write(wav_dir / f"{utt}.wav", tone(seconds, freq, rate), rate, subtype="PCM_16")
    return (
        f"[{start:.4f} - {start + seconds:.4f}]\t{utt}\t{label}\t[2.5000, 3.0000, 3.5000]\n"
        "C-E2:\tNeutral state;\t()\nC-E3:\tNeutral state;\t()\n"
        "A-E3:\tval 3; act 2; dom  2;\t()\n\n"
    )


def write_tree(
    root: Path,
    per_session: int = 8,
    rate: int = 16000,
    script_lines: int = 0,
    transcriptions: bool = True,
) -> Path:
    """5 sessions; each dialog holds utterances of both genders with labels cycling over LABELS.

    ``script_lines`` > 0 adds a scripted dialog ``SesNNM_script01_1`` per session in which
    both speakers say the first ``script_lines`` lines of :data:`SCRIPT`; ``transcriptions``
    writes ``dialog/transcriptions/<dialog>.txt`` for every dialog (improvised ones too).
    """
    root = Path(root)
    for s in range(1, 6):
        session = root / f"Session{s}"
        eval_dir = session / "dialog" / "EmoEvaluation"
        for sub in ("Categorical", "Attribute", "Self-evaluation"):
            (eval_dir / sub).mkdir(parents=True, exist_ok=True)
            (eval_dir / sub / f"Ses0{s}F_impro01_e1_cat.txt").write_text(
                f"Ses0{s}F_impro01_F000 :Neutral state; ()\n"
            )
        dialog = f"Ses0{s}F_impro01"
        blocks, start, lines = [HEADER], 0.0, []
        for i in range(per_session):
            gender = "F" if i % 2 == 0 else "M"
            utt = f"{dialog}_{gender}{i:03d}"
            label = LABELS[(i + s) % len(LABELS)]
            seconds = 1.0 + 0.25 * (i % 4)
            blocks.append(
                _utterance(session, dialog, utt, label, start, seconds, 200 + 20 * i, rate)
            )
            lines.append(f"{utt} [{start:08.4f}-{start + seconds:08.4f}]: Improvised turn {i}.\n")
            start += seconds + 0.5
        (eval_dir / f"{dialog}.txt").write_text("".join(blocks))
        (eval_dir / f"._{dialog}.txt").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
        dialogs = {dialog: lines}
        if script_lines:
            script = f"Ses0{s}M_script01_1"
            blocks, start, lines = [HEADER], 0.0, ["M: [BREATHING]\n"]  # a line without an id
            for j in range(script_lines):
                for k, gender in enumerate("FM"):
                    utt = f"{script}_{gender}{j:03d}"
                    label = LABELS[(2 * j + k + s) % 4]
                    blocks.append(
                        _utterance(session, script, utt, label, start, 1.0, 300 + 30 * j, rate)
                    )
                    lines.append(f"{utt} [{start:08.4f}-{start + 1:08.4f}]: {script_text(s, j)}\n")
                    start += 1.5
            (eval_dir / f"{script}.txt").write_text("".join(blocks))
            dialogs[script] = lines
        if transcriptions:
            folder = session / "dialog" / "transcriptions"
            folder.mkdir(parents=True, exist_ok=True)
            for name, text in dialogs.items():
                (folder / f"{name}.txt").write_text("".join(text))
    return root


if __name__ == "__main__":
    import sys

    print(write_tree(Path(sys.argv[1])))
