"""A small synthetic stand-in for IEMOCAP, rendered with eSpeak NG.

:func:`write_synthetic_corpus` writes a corpus in the exact ``IEMOCAP_full_release`` layout
(``Session{n}/dialog/EmoEvaluation/*.txt``, ``Session{n}/dialog/transcriptions/*.txt`` and
``Session{n}/sentences/wav/<dialog>/*.wav``), so the IEMOCAP parser reads it unchanged.
Emotion is carried by prosody only: each class has a pitch / pitch-range / rate / level
profile (:data:`CLASS_PROSODY`), blurred by per-speaker offsets and per-utterance jitter so
that no single feature separates the classes. Sentences are drawn from word lists on random
streams of their own, independently of the label.

Like IEMOCAP, the corpus has a scripted and an improvised part. The script is a fixed list of
sentences (``round(scripted_fraction * utterances_per_speaker)``, default half of each
speaker's balanced utterances) that *every* speaker says, once each, in emotions that vary
from speaker to speaker; these lines sit in ``_script`` dialogs. The other utterances are
improvised (a fresh sentence each, ``_impro`` dialogs). The transcriptions carry the text, so
the IEMOCAP reader recovers each scripted utterance's line as its recurring ``item``
(:mod:`serlens.corpus.iemocap`), which the probing control task needs.

The same ``seed`` gives byte-identical files. Besides the IEMOCAP files the corpus root holds
``README.txt`` and ``synth_manifest.tsv`` (one row per utterance with the rendering
parameters), which an IEMOCAP parser never looks at.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from serlens.corpus.espeak import synthesize

__all__ = [
    "CLASS_PROSODY",
    "EXTRA_LABELS",
    "SCRIPTED_FRACTION",
    "SESSION_VOICES",
    "SYNTH_CLASSES",
    "Prosody",
    "write_synthetic_corpus",
]

SYNTH_CLASSES = ("neu", "hap", "ang", "sad")
#: Default share of each speaker's balanced utterances that are script lines.
SCRIPTED_FRACTION = 0.5
#: Rendered once per speaker on top of the balanced classes; exercise label mapping/dropping.
EXTRA_LABELS = ("exc", "fru", "xxx")

#: eSpeak voice variant of each session's female (``F``) and male (``M``) speaker.
SESSION_VOICES: dict[int, dict[str, str]] = {
    n: {"F": f"en-us+f{n}", "M": f"en-us+m{n}"} for n in range(1, 6)
}


@dataclass(frozen=True)
class Prosody:
    """eSpeak pitch (0-100), pitch range (0-100), rate (wpm), and output level in dB."""

    pitch: float
    pitch_range: float
    rate: float
    gain_db: float


#: Class means. Level is relative to a -1 dBFS peak-normalised rendering.
CLASS_PROSODY: dict[str, Prosody] = {
    "neu": Prosody(pitch=48, pitch_range=40, rate=165, gain_db=-8.0),
    "hap": Prosody(pitch=64, pitch_range=75, rate=185, gain_db=-5.0),
    "ang": Prosody(pitch=56, pitch_range=60, rate=205, gain_db=-2.0),
    "sad": Prosody(pitch=36, pitch_range=20, rate=140, gain_db=-12.0),
    # extras: excited is rendered like happy, frustrated halfway between neutral and angry,
    # xxx (no evaluator agreement) like a randomly chosen base class.
    "exc": Prosody(pitch=64, pitch_range=75, rate=185, gain_db=-5.0),
    "fru": Prosody(pitch=52, pitch_range=50, rate=185, gain_db=-5.0),
}
#: Standard deviation of the per-utterance jitter and of the per-speaker offsets.
UTTERANCE_JITTER = Prosody(pitch=7, pitch_range=12, rate=15, gain_db=2.5)
SPEAKER_OFFSET = Prosody(pitch=5, pitch_range=6, rate=10, gain_db=1.5)
_LIMITS = {"pitch": (5, 95), "pitch_range": (0, 100), "rate": (100, 300), "gain_db": (-24, 0)}

MIN_SECONDS, MAX_SECONDS = 1.2, 3.5
_PEAK = 10 ** (-1 / 20)  # -1 dBFS before the class level is applied
_NOISE_DBFS = -66.0  # faint recording noise, so silences are not digital zeros

# --- IEMOCAP annotation vocabulary -------------------------------------------------------
_CATEGORY = {
    "neu": "Neutral state",
    "hap": "Happiness",
    "ang": "Anger",
    "sad": "Sadness",
    "exc": "Excited",
    "fru": "Frustration",
}
_CONFUSABLE = {
    "neu": ("Frustration", "Sadness", "Other"),
    "hap": ("Excited", "Neutral state", "Surprise"),
    "ang": ("Frustration", "Disgust", "Neutral state"),
    "sad": ("Neutral state", "Frustration", "Fear"),
    "exc": ("Happiness", "Surprise", "Neutral state"),
    "fru": ("Anger", "Neutral state", "Sadness"),
}
_XXX_POOL = ("Neutral state", "Frustration", "Anger", "Sadness", "Happiness", "Excited", "Other")
_VAD = {  # typical valence, activation, dominance (1-5)
    "neu": (3, 2, 2),
    "hap": (4, 3, 3),
    "exc": (4, 4, 3),
    "ang": (2, 4, 4),
    "fru": (2, 3, 3),
    "sad": (2, 2, 2),
    "xxx": (3, 3, 3),
}
_CAT_EVALUATORS = ("C-E2", "C-E3", "C-E4")
_ATTR_EVALUATORS = ("A-E3", "A-E4")
_HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
# AppleDouble header as left behind by macOS archivers ("._name" files).
_APPLE_DOUBLE = (
    b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02\x00\x00\x00\t\x00\x00\x002"
    b"\x00\x00\x0e\xb0\x00\x00\x00\x02\x00\x00\x0e\xe2\x00\x00\x01\x1e\x00\x00\x00\x00"
    + bytes(range(256))
)

# --- sentence material: neutral content, drawn independently of the label ----------------
_SUBJECTS = (
    "The teacher", "My brother", "Our neighbour", "The driver", "Her cousin", "The old man",
    "A young woman", "The manager", "Your friend", "The children", "His sister", "The nurse",
    "That student", "The farmer", "My aunt", "The pilot", "Our coach", "The baker",
    "Their uncle", "The new clerk", "The painter", "My father",
)  # fmt: skip
_VERBS = (  # (past, base)
    ("moved", "move"), ("painted", "paint"), ("opened", "open"), ("carried", "carry"),
    ("cleaned", "clean"), ("found", "find"), ("sold", "sell"), ("fixed", "fix"),
    ("bought", "buy"), ("checked", "check"), ("brought", "bring"), ("packed", "pack"),
    ("washed", "wash"), ("closed", "close"), ("lost", "lose"), ("counted", "count"),
    ("borrowed", "borrow"), ("ordered", "order"), ("noticed", "notice"), ("measured", "measure"),
)  # fmt: skip
_OBJECTS = (
    "the blue car", "the kitchen table", "a large box", "the front door", "the letters",
    "the garden fence", "a paper map", "the window", "two chairs", "the old piano",
    "a green bottle", "the tickets", "the shop sign", "a wooden boat", "the lamp",
    "the bicycle", "the report", "a red coat", "the small radio", "the keys", "the garage",
    "a cup of tea", "the train times", "the bookshelf", "the photos",
)  # fmt: skip
_TIMES = (
    "this morning", "last night", "on Monday", "after lunch", "yesterday", "before dinner",
    "at noon", "last week", "at night", "in the evening", "today", "at six",
    "on Friday", "after work", "in April",
)  # fmt: skip


def _sentence(rng: np.random.Generator) -> str:
    subj = _SUBJECTS[rng.integers(len(_SUBJECTS))]
    past, base = _VERBS[rng.integers(len(_VERBS))]
    obj = _OBJECTS[rng.integers(len(_OBJECTS))]
    when = _TIMES[rng.integers(len(_TIMES))]
    form = rng.integers(4)
    if form == 0:
        return f"{subj} {past} {obj}."
    if form == 1:
        return f"{subj} {past} {obj} {when}."
    if form == 2:
        return f"{when[0].upper()}{when[1:]}, {subj[0].lower()}{subj[1:]} {past} {obj}."
    return f"Did {subj[0].lower()}{subj[1:]} {base} {obj}?"


# --- planning ---------------------------------------------------------------------------
@dataclass
class _Utt:
    session: int
    gender: str  # "F" / "M"
    label: str  # IEMOCAP label written to EmoEvaluation
    render: str  # prosody class actually rendered
    script_line: int | None = None  # index into the script (None = improvised)
    text: str = ""
    prosody: Prosody | None = None
    dialog: str = ""
    utt_id: str = ""
    start: float = 0.0
    end: float = 0.0
    synth_seed: int = 0
    lead: float = 0.0


def _dialog_names(session: int, n: int, scripted: bool = True) -> tuple[list[str], list[str]]:
    """(improvised, scripted) dialog names of one session, ``n`` in all (the script dialogs
    hold the scripted part; without one, every dialog is improvised)."""
    s = f"Ses{session:02d}"
    impro = [f"{s}F_impro01", f"{s}M_impro03", f"{s}F_impro05", f"{s}M_impro07"]
    script = [f"{s}M_script02_1", f"{s}F_script01_2"]
    if not scripted:
        return impro[:n], []
    n_script = n // 2 + (n % 2)  # 2 -> 1 + 1, 3 -> 1 + 2, 4 -> 2 + 2
    return impro[: n - n_script], script[:n_script]


def _script(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct sentences: the script every speaker performs."""
    out: list[str] = []
    while len(out) < n:
        sentence = _sentence(rng)
        if sentence not in out:
            out.append(sentence)
    return out


def _clip(p: Prosody) -> Prosody:
    return Prosody(
        *(float(np.clip(getattr(p, f), *_LIMITS[f])) for f in Prosody.__dataclass_fields__)
    )


def _draw(rng: np.random.Generator, sd: Prosody) -> Prosody:
    return Prosody(*(float(rng.normal(0.0, getattr(sd, f))) for f in Prosody.__dataclass_fields__))


def _add(a: Prosody, b: Prosody) -> Prosody:
    return Prosody(*(getattr(a, f) + getattr(b, f) for f in Prosody.__dataclass_fields__))


def _balanced_labels(utterances_per_speaker: int, speaker_index: int) -> list[str]:
    """Balanced classes; the remainder rotates over speakers so totals stay balanced."""
    base, extra = divmod(utterances_per_speaker, len(SYNTH_CLASSES))
    labels = []
    for k, cls in enumerate(SYNTH_CLASSES):
        bonus = (k - speaker_index) % len(SYNTH_CLASSES) < extra
        labels += [cls] * (base + int(bonus))
    return labels


def _interleave(labels: list[str], order: np.ndarray) -> list[str]:
    """``labels`` round-robin over the classes in ``order``: any prefix is as balanced as possible."""
    queues = [[x for x in labels if x == SYNTH_CLASSES[k]] for k in order]
    out = []
    while any(queues):
        for queue in queues:
            if queue:
                out.append(queue.pop())
    return out


def n_script_lines(utterances_per_speaker: int, scripted_fraction: float) -> int:
    """Sentences in the script (each speaker says each once): the scripted part of a speaker."""
    return int(np.floor(scripted_fraction * utterances_per_speaker + 0.5))


def _plan(
    utterances_per_speaker: int, seed: int, scripted_fraction: float = 0.5
) -> tuple[list[list[_Utt]], list[str]]:
    """Labels, speakers, dialogs, sentences and prosody for every utterance, per dialog; and the script.

    Each speaker's labels are balanced over :data:`SYNTH_CLASSES`; the first
    :func:`n_script_lines` of them, taken round-robin over the classes (so the scripted part is
    balanced too), are said as the script's lines, one line each, in a random order: every
    line is said by every speaker, each time in an emotion of its own. The rest, and the extra
    labels, are improvised: a fresh sentence each.
    """
    ss = np.random.SeedSequence(seed)
    plan_rng, text_rng, prosody_rng, _, _, script_rng = (
        np.random.default_rng(s) for s in ss.spawn(6)
    )
    n_lines = n_script_lines(utterances_per_speaker, scripted_fraction)
    script = _script(n_lines, script_rng)
    per_speaker = utterances_per_speaker + len(EXTRA_LABELS)
    n_dialogs = int(np.clip(per_speaker // 6, 2, 4))
    dialogs: list[list[_Utt]] = []
    speaker_index = 0
    for session in range(1, 6):
        impro_names, script_names = _dialog_names(session, n_dialogs, scripted=n_lines > 0)
        script_names = script_names[:n_lines]  # no empty script dialog
        per_dialog: dict[str, dict[str, list[_Utt]]] = {
            name: {"F": [], "M": []} for name in (*impro_names, *script_names)
        }
        for gender in ("F", "M"):
            labels = _interleave(
                _balanced_labels(utterances_per_speaker, speaker_index),
                plan_rng.permutation(len(SYNTH_CLASSES)),
            )
            lines = plan_rng.permutation(n_lines)
            speaker_index += 1
            offset = _draw(plan_rng, SPEAKER_OFFSET)
            improvised = []
            for k, label in enumerate([*labels, *EXTRA_LABELS]):
                render = label
                if label == "xxx":
                    render = SYNTH_CLASSES[plan_rng.integers(len(SYNTH_CLASSES))]
                u = _Utt(session=session, gender=gender, label=label, render=render)
                u.prosody = _clip(
                    _add(_add(CLASS_PROSODY[render], offset), _draw(prosody_rng, UTTERANCE_JITTER))
                )
                if k < n_lines:
                    u.script_line = int(lines[k])
                    u.text = script[u.script_line]
                    name = script_names[u.script_line % len(script_names)]
                    per_dialog[name][gender].append(u)
                else:
                    improvised.append(u)
            for i, j in enumerate(plan_rng.permutation(len(improvised))):
                per_dialog[impro_names[i % len(impro_names)]][gender].append(improvised[j])
        for name, speakers in per_dialog.items():
            for gender in ("F", "M"):  # a script is performed in its line order
                speakers[gender].sort(key=lambda u: -1 if u.script_line is None else u.script_line)
            order = ["F"] * len(speakers["F"]) + ["M"] * len(speakers["M"])
            order = [order[k] for k in plan_rng.permutation(len(order))]
            counters = {"F": 0, "M": 0}
            dialog = []
            for gender in order:
                u = speakers[gender][counters[gender]]
                u.dialog = name
                u.utt_id = f"{name}_{gender}{counters[gender]:03d}"
                counters[gender] += 1
                dialog.append(u)
            dialogs.append(dialog)
    # Improvised sentences and synthesis seeds in corpus order, from their own stream:
    # independent of labels (an improvised sentence never repeats a script line).
    for dialog in dialogs:
        for u in dialog:
            if u.script_line is None:
                u.text = _sentence(text_rng)
                while u.text in script:
                    u.text = _sentence(text_rng)
            u.synth_seed = int(text_rng.integers(2**31))
            u.lead = float(text_rng.uniform(0.05, 0.25))
    return dialogs, script


# --- audio ------------------------------------------------------------------------------
def _frame_db(y: np.ndarray, frame: int, hop: int) -> np.ndarray:
    n = 1 + max(0, len(y) - frame) // hop
    idx = np.arange(frame)[None, :] + hop * np.arange(n)[:, None]
    rms = np.sqrt(np.mean(np.square(y[np.minimum(idx, len(y) - 1)], dtype=np.float64), axis=1))
    return 20 * np.log10(np.maximum(rms, 1e-10))


def _trim_silences(
    y: np.ndarray, sr: int, top_db: float = 40.0, max_gap: float = 0.2, pad: float = 0.05
) -> np.ndarray:
    """Drop leading/trailing silence and shorten inner pauses to ``max_gap`` seconds."""
    frame, hop = int(0.02 * sr), int(0.01 * sr)
    db = _frame_db(y, frame, hop)
    voiced = db > db.max() - top_db
    if not voiced.any():
        return y
    # voiced runs in samples
    edges = np.flatnonzero(np.diff(np.concatenate([[0], voiced.astype(np.int8), [0]])))
    runs = [(s * hop, min(len(y), (e - 1) * hop + frame)) for s, e in edges.reshape(-1, 2)]
    padn, gapn = int(pad * sr), int(max_gap * sr)
    pieces = [y[max(0, runs[0][0] - padn) : runs[0][0]]]
    prev_end = runs[0][0]
    for s, e in runs:
        if s - prev_end > gapn:
            pieces += [y[prev_end : prev_end + gapn // 2], y[s - (gapn - gapn // 2) : s]]
        else:
            pieces.append(y[prev_end:s])
        pieces.append(y[s:e])
        prev_end = e
    pieces.append(y[prev_end : prev_end + padn])
    return np.concatenate(pieces)


def _render(u: _Utt, sample_rate: int, noise_rng: np.random.Generator) -> np.ndarray:
    import librosa

    p = u.prosody
    assert p is not None
    voice = SESSION_VOICES[u.session][u.gender]
    y, native_sr = synthesize(
        u.text,
        voice=voice,
        pitch=round(p.pitch),
        pitch_range=round(p.pitch_range),
        rate=round(p.rate),
        seed=u.synth_seed,
    )
    y = librosa.resample(
        y.astype(np.float64), orig_sr=native_sr, target_sr=sample_rate, res_type="soxr_hq"
    )
    y = _trim_silences(y, sample_rate)
    y = y * (_PEAK / max(float(np.abs(y).max()), 1e-9)) * 10 ** (p.gain_db / 20)
    lo, hi = int(MIN_SECONDS * sample_rate), int(MAX_SECONDS * sample_rate)
    # leading/trailing silence, given up first when the clip would be too long
    lead = min(int(u.lead * sample_rate), max(0, hi - len(y)))
    tail = min(int(0.1 * sample_rate), max(0, hi - len(y) - lead))
    y = np.concatenate([np.zeros(lead), y, np.zeros(tail)])
    if len(y) < lo:
        y = np.concatenate([y, np.zeros(lo - len(y))])
    if len(y) > hi:  # rare: a long sentence at a slow rate; fade out instead of clicking
        y = y[:hi].copy()
        fade = int(0.05 * sample_rate)
        y[-fade:] *= np.linspace(1.0, 0.0, fade)
    y = y + noise_rng.normal(0.0, 10 ** (_NOISE_DBFS / 20), len(y))
    return np.clip(np.round(y * 32767), -32768, 32767).astype(np.int16)


# --- annotation text --------------------------------------------------------------------
def _annotations(u: _Utt, rng: np.random.Generator) -> tuple[list[str], list[tuple[int, ...]]]:
    if u.label == "xxx":
        cats = [_XXX_POOL[k] for k in rng.permutation(len(_XXX_POOL))[: len(_CAT_EVALUATORS)]]
    else:
        cats = [_CATEGORY[u.label]] * len(_CAT_EVALUATORS)
        if rng.random() < 0.5:  # one dissenting evaluator; the majority still holds
            cats[int(rng.integers(len(cats)))] = _CONFUSABLE[u.label][
                int(rng.integers(len(_CONFUSABLE[u.label])))
            ]
    vads = [
        tuple(int(np.clip(v + rng.integers(-1, 2), 1, 5)) for v in _VAD[u.label])
        for _ in _ATTR_EVALUATORS
    ]
    return cats, vads


def _emo_block(u: _Utt, cats: list[str], vads: list[tuple[int, ...]]) -> str:
    v, a, d = np.mean(np.array(vads, dtype=float), axis=0)
    lines = [f"[{u.start:.4f} - {u.end:.4f}]\t{u.utt_id}\t{u.label}\t[{v:.4f}, {a:.4f}, {d:.4f}]"]
    lines += [f"{ev}:\t{cat};\t()" for ev, cat in zip(_CAT_EVALUATORS, cats, strict=True)]
    lines += [
        f"{ev}:\tval {va}; act {ac}; dom  {do};\t()"
        for ev, (va, ac, do) in zip(_ATTR_EVALUATORS, vads, strict=True)
    ]
    return "\n".join(lines) + "\n\n"


def _write_decoys(emo_dir: Path, dialog: str, rows: list[tuple[_Utt, list[str], list]]) -> None:
    """Files a parser must skip: evaluator sub-folders and macOS resource-fork junk."""
    for k, ev in enumerate(_CAT_EVALUATORS):
        text = "".join(f"{u.utt_id} :{cats[k]}; ()\n" for u, cats, _ in rows)
        (emo_dir / "Categorical" / f"{dialog}_{ev[2:].lower()}_cat.txt").write_text(text)
    for k, ev in enumerate(_ATTR_EVALUATORS):
        text = "".join(
            f"{u.utt_id} :act {vads[k][1]}; val {vads[k][0]}; dom {vads[k][2]}; ()\n"
            for u, _, vads in rows
        )
        (emo_dir / "Attribute" / f"{dialog}_{ev[2:].lower()}_atr.txt").write_text(text)
    # Same file name as the real EmoEvaluation file, different format: only a recursive
    # glob would pick it up.
    text = "".join(f"{u.utt_id} :{cats[0]}; val 3; act 3; dom 3; ()\n" for u, cats, _ in rows)
    (emo_dir / "Self-evaluation" / f"{dialog}.txt").write_text(text)


# --- entry point ------------------------------------------------------------------------
def write_synthetic_corpus(
    root: Path,
    *,
    utterances_per_speaker: int = 20,
    seed: int = 0,
    sample_rate: int = 16000,
    scripted_fraction: float = SCRIPTED_FRACTION,
) -> Path:
    """Synthesise an IEMOCAP-shaped corpus at ``root`` and return ``root``.

    5 sessions x 2 speakers (one female, one male eSpeak variant per session, see
    :data:`SESSION_VOICES`); each speaker says ``utterances_per_speaker`` utterances balanced
    over :data:`SYNTH_CLASSES`, plus one each labelled ``exc``, ``fru`` and ``xxx``. Of the
    balanced ones, ``round(scripted_fraction * utterances_per_speaker)`` are the script's
    lines (the same sentences for every speaker, in ``_script`` dialogs), the others and the
    extras are improvised (``_impro`` dialogs). The corpus is built in a temporary sibling
    directory and renamed to ``root`` when complete.

    Raises FileExistsError if ``root`` exists.
    """
    root = Path(root)
    if utterances_per_speaker < 1:
        raise ValueError("utterances_per_speaker must be >= 1")
    if not 0.0 <= scripted_fraction <= 1.0:
        raise ValueError(f"scripted_fraction must be in [0, 1], not {scripted_fraction}")
    if root.exists():
        raise FileExistsError(f"{root} already exists; remove it or choose another path")
    root.parent.mkdir(parents=True, exist_ok=True)
    dialogs, script = _plan(utterances_per_speaker, seed, scripted_fraction)
    _, _, _, noise_ss, annot_ss = np.random.SeedSequence(seed).spawn(5)
    noise_rng, annot_rng = np.random.default_rng(noise_ss), np.random.default_rng(annot_ss)

    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        tmp.chmod(0o755)
        manifest = [
            "utt_id\tsession\tgender\tvoice\tlabel\trendered_as\tpitch\tpitch_range\trate"
            "\tgain_db\tseconds\tscript_line\ttext"
        ]
        for session in range(1, 6):
            emo_dir = tmp / f"Session{session}" / "dialog" / "EmoEvaluation"
            for sub in ("Categorical", "Attribute", "Self-evaluation"):
                (emo_dir / sub).mkdir(parents=True)
            transcriptions = tmp / f"Session{session}" / "dialog" / "transcriptions"
            transcriptions.mkdir()
            session_dialogs = [d for d in dialogs if d[0].session == session]
            for dialog in session_dialogs:
                name = dialog[0].dialog
                wav_dir = tmp / f"Session{session}" / "sentences" / "wav" / name
                wav_dir.mkdir(parents=True)
                t = float(annot_rng.uniform(1.0, 8.0))
                rows = []
                for u in dialog:
                    pcm = _render(u, sample_rate, noise_rng)
                    sf.write(wav_dir / f"{u.utt_id}.wav", pcm, sample_rate, subtype="PCM_16")
                    u.start, u.end = t, t + len(pcm) / sample_rate
                    t = u.end + float(annot_rng.uniform(0.3, 2.5))
                    cats, vads = _annotations(u, annot_rng)
                    rows.append((u, cats, vads))
                    p = u.prosody
                    manifest.append(
                        f"{u.utt_id}\t{session}\t{u.gender}\t{SESSION_VOICES[session][u.gender]}"
                        f"\t{u.label}\t{u.render}\t{p.pitch:.1f}\t{p.pitch_range:.1f}"
                        f"\t{p.rate:.1f}\t{p.gain_db:.2f}\t{u.end - u.start:.4f}"
                        f"\t{'' if u.script_line is None else u.script_line}\t{u.text}"
                    )
                emo_text = _HEADER + "".join(_emo_block(u, c, v) for u, c, v in rows)
                (emo_dir / f"{name}.txt").write_text(emo_text)
                (transcriptions / f"{name}.txt").write_text(
                    "".join(
                        f"{u.utt_id} [{u.start:08.4f}-{u.end:08.4f}]: {u.text}\n" for u in dialog
                    )
                )
                _write_decoys(emo_dir, name, rows)
            (emo_dir / f"._{session_dialogs[0][0].dialog}.txt").write_bytes(_APPLE_DOUBLE)
        (tmp / "synth_manifest.tsv").write_text("\n".join(manifest) + "\n")
        (tmp / "README.txt").write_text(
            "Synthetic IEMOCAP-layout corpus rendered with eSpeak NG by serlens.corpus.synth.\n"
            f"seed={seed} utterances_per_speaker={utterances_per_speaker} "
            f"sample_rate={sample_rate} scripted_fraction={scripted_fraction}\n"
            "Emotion is conveyed by prosody only; sentences are independent of the labels.\n"
            f"Scripted part: {len(script)} sentences, each said once by every speaker "
            "(in the _script dialogs); the rest is improvised.\n"
            "synth_manifest.tsv lists the rendering parameters of every utterance "
            "(script_line: the index of its script sentence, empty if improvised).\n"
        )
        if root.exists():
            raise FileExistsError(f"{root} appeared while the corpus was being written")
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
