"""Write a small tree in IEMOCAP_full_release's exact format (the tests' own data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
LABELS = ["neu", "hap", "ang", "sad", "exc", "fru", "xxx", "sur"]


def tone(seconds: float, freq: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_tree(root: Path, per_session: int = 8, rate: int = 16000) -> Path:
    """5 sessions; each dialog holds utterances of both genders with labels cycling over LABELS."""
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
        blocks, start = [HEADER], 0.0
        for i in range(per_session):
            gender = "F" if i % 2 == 0 else "M"
            utt = f"{dialog}_{gender}{i:03d}"
            label = LABELS[(i + s) % len(LABELS)]
            seconds = 1.0 + 0.25 * (i % 4)
            blocks.append(
                f"[{start:.4f} - {start + seconds:.4f}]\t{utt}\t{label}\t[2.5000, 3.0000, 3.5000]\n"
                "C-E2:\tNeutral state;\t()\nC-E3:\tNeutral state;\t()\n"
                "A-E3:\tval 3; act 2; dom  2;\t()\n\n"
            )
            start += seconds + 0.5
            wav_dir = session / "sentences" / "wav" / dialog
            wav_dir.mkdir(parents=True, exist_ok=True)
            sf.write(
                wav_dir / f"{utt}.wav", tone(seconds, 200 + 20 * i, rate), rate, subtype="PCM_16"
            )
        (eval_dir / f"{dialog}.txt").write_text("".join(blocks))
        (eval_dir / f"._{dialog}.txt").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    return root


if __name__ == "__main__":
    import sys

    print(write_tree(Path(sys.argv[1])))
