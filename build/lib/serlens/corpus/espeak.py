"""Drive eSpeak NG without root: ctypes on the library shipped in the ``espeakng_loader`` wheel.

The wheel carries ``libespeak-ng`` and its ``espeak-ng-data`` directory, so nothing has to be
installed system-wide. An ``espeak-ng`` binary on ``PATH`` is used only as a fallback when the
wheel cannot be loaded.

Determinism. eSpeak NG keeps waveform-generator state in C globals (phase, flutter, echo buffer)
that survive ``espeak_Terminate``/``espeak_Initialize``, and ``espeak_Initialize`` seeds its noise
generator (breathy variants such as ``f2``, ``f3``, ``f5``) from the clock. Two identical calls on
one loaded library therefore give different bytes, depending on everything synthesised before.
To make the output a pure function of the arguments, every call here runs on a freshly loaded
private copy of the library (``dlopen`` ... ``dlclose``, about 5 ms) and reseeds the noise
generator with ``seed``. eSpeak is global state, so calls are serialised with a lock.
"""

from __future__ import annotations

import atexit
import ctypes
import io
import platform
import shutil
import subprocess
import tempfile
import threading
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["EspeakError", "available_variants", "backend", "synthesize"]

# speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_INITIALIZE_DONT_EXIT = 0x8000  # return an error instead of calling exit()
_EE_OK = 0
_EE_NOT_FOUND = 2
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4  # espeak_PARAMETER

# int SynthCallback(short *wav, int numsamples, espeak_EVENT *events)
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

_INSTALL_HINT = "pip install espeakng-loader"


class EspeakError(RuntimeError):
    """eSpeak NG is unavailable or failed to synthesise."""


@dataclass(frozen=True)
class _Wheel:
    """Where the private library copy and the voice data live."""

    lib_copy: Path
    data_path: Path


_lock = threading.Lock()  # serialises synthesis: eSpeak's C state is process-global
_init_lock = threading.Lock()
_wheel: _Wheel | None = None
_wheel_error: str | None = None
_chunks: list[bytes] = []


def _collect(wav, numsamples, _events):  # called from C during espeak_Synth
    if wav and numsamples > 0:
        _chunks.append(ctypes.string_at(wav, numsamples * 2))
    return 0  # 0 = continue synthesis


# Module-level reference: the C side holds only a raw pointer to this thunk.
_callback = _SYNTH_CALLBACK(_collect)


def _dlclose(handle: int) -> None:
    import _ctypes

    close = getattr(_ctypes, "dlclose", None) or getattr(_ctypes, "FreeLibrary", None)
    if close is not None:
        close(handle)


def _locate_wheel() -> _Wheel:
    """Find the wheel's library and data once; copy the library to a private temp file.

    The private copy guarantees that our ``dlclose`` really unloads it (nobody else in the
    process holds a reference), so the next ``dlopen`` starts from pristine C globals.
    """
    with _init_lock:
        return _locate_wheel_locked()


def _locate_wheel_locked() -> _Wheel:
    global _wheel, _wheel_error
    if _wheel is not None:
        return _wheel
    if _wheel_error is not None:
        raise EspeakError(_wheel_error)
    try:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise EspeakError(
                f"eSpeak NG library not found: the espeakng_loader package is not installed "
                f"({exc}). Install it with `{_INSTALL_HINT}`."
            ) from exc
        lib_path = Path(espeakng_loader.get_library_path())
        try:
            data_path = Path(espeakng_loader.get_data_path())
        except RuntimeError as exc:
            raise EspeakError(
                f"eSpeak NG voice data missing from espeakng_loader ({exc}); "
                f"reinstall it with `{_INSTALL_HINT} --force-reinstall`."
            ) from exc
        if not lib_path.is_file():
            raise EspeakError(
                f"eSpeak NG library not found at {lib_path} (espeakng_loader has no build for "
                f"{platform.system()}/{platform.machine()}?). Reinstall with `{_INSTALL_HINT}`, "
                f"or install an `espeak-ng` binary on PATH."
            )
        tmpdir = Path(tempfile.mkdtemp(prefix="serlens-espeak-"))
        atexit.register(shutil.rmtree, tmpdir, ignore_errors=True)
        lib_copy = tmpdir / lib_path.name
        shutil.copyfile(lib_path, lib_copy)
        try:  # fail early, with a clear message, if the copy cannot be loaded
            handle = ctypes.CDLL(str(lib_copy))._handle
        except OSError as exc:
            raise EspeakError(
                f"cannot load eSpeak NG library {lib_path}: {exc}. Reinstall with "
                f"`{_INSTALL_HINT}`, or install an `espeak-ng` binary on PATH."
            ) from exc
        _dlclose(handle)
    except EspeakError as exc:
        _wheel_error = str(exc)
        raise
    _wheel = _Wheel(lib_copy=lib_copy, data_path=data_path)
    return _wheel


def backend() -> str:
    """``"ctypes"`` (the espeakng_loader wheel), ``"binary"`` (espeak-ng on PATH); else raises."""
    try:
        _locate_wheel()
        return "ctypes"
    except EspeakError:
        if shutil.which("espeak-ng"):
            return "binary"
        raise


def available_variants() -> list[str]:
    """Voice variants (the part after ``+``, e.g. ``f3``, ``m7``) shipped with the wheel."""
    vdir = _locate_wheel().data_path / "voices" / "!v"
    return sorted(p.name for p in vdir.iterdir() if p.is_file())


def _check_args(text: str, pitch: int, pitch_range: int, rate: int, volume: int) -> None:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty string")
    for name, value, lo, hi in (
        ("pitch", pitch, 0, 100),
        ("pitch_range", pitch_range, 0, 100),
        ("rate", rate, 80, 450),
        ("volume", volume, 0, 200),
    ):
        if not isinstance(value, int | np.integer) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"{name}={value} outside eSpeak's range [{lo}, {hi}]")


def _voice_name(voice: str, variant: str | None) -> str:
    if variant is None:
        return voice
    if "+" in voice:
        raise ValueError(f"voice {voice!r} already names a variant; do not also pass variant=")
    return f"{voice}+{variant}"


def _synth_ctypes(
    wheel: _Wheel, text: bytes, name: str, params: dict[int, int], seed: int
) -> tuple[np.ndarray, int]:
    lib = ctypes.CDLL(str(wheel.lib_copy))
    try:
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Terminate.restype = ctypes.c_int

        sample_rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS,
            0,
            str(wheel.data_path).encode(),
            _ESPEAK_INITIALIZE_DONT_EXIT,
        )
        if sample_rate <= 0:
            raise EspeakError(
                f"espeak_Initialize failed (returned {sample_rate}) with data path "
                f"{wheel.data_path}; reinstall with `{_INSTALL_HINT} --force-reinstall`."
            )
        try:
            lib.espeak_SetSynthCallback(_callback)
            status = lib.espeak_SetVoiceByName(name.encode())
            if status == _EE_NOT_FOUND:
                raise ValueError(f"eSpeak NG has no voice {name!r}")
            if status != _EE_OK:
                raise EspeakError(f"espeak_SetVoiceByName({name!r}) failed with status {status}")
            for param, value in params.items():
                status = lib.espeak_SetParameter(param, int(value), 0)
                if status != _EE_OK:
                    raise EspeakError(f"espeak_SetParameter({param}, {value}) failed: {status}")
            lib.espeak_ng_SetRandSeed(seed)
            buf = ctypes.create_string_buffer(text)  # NUL-terminated
            _chunks.clear()
            status = lib.espeak_Synth(
                buf, len(buf), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None
            )
            if status != _EE_OK:
                raise EspeakError(f"espeak_Synth failed with status {status}")
            pcm = b"".join(_chunks)
        finally:
            _chunks.clear()
            lib.espeak_Terminate()
    finally:
        handle = lib._handle
        del lib
        _dlclose(handle)
    return np.frombuffer(pcm, dtype=np.int16), sample_rate


def _synth_binary(
    exe: str, text: str, name: str, pitch: int, pitch_range: int, rate: int, volume: int
) -> tuple[np.ndarray, int]:
    cmd = [exe, "--stdout", "-b", "1", "-v", name, "-p", str(pitch), "-P", str(pitch_range)]
    cmd += ["-s", str(rate), "-a", str(volume), "--", text]
    try:
        proc = subprocess.run(cmd, capture_output=True, check=True, timeout=120)
    except subprocess.CalledProcessError as exc:
        msg = exc.stderr.decode(errors="replace").strip()
        raise EspeakError(f"{' '.join(cmd[:-1])} ... failed: {msg}") from exc
    return _parse_wav(proc.stdout)


def _parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Read espeak-ng --stdout WAV (its size fields are bogus when streaming)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        try:  # fall back to the stdlib parser for anything unusual
            with wave.open(io.BytesIO(data)) as w:
                return np.frombuffer(w.readframes(w.getnframes()), "<i2"), w.getframerate()
        except (wave.Error, EOFError) as exc:
            raise EspeakError("espeak-ng did not write a WAV stream") from exc
    sample_rate = int.from_bytes(data[24:28], "little")
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if cid == b"data":
            body = data[pos + 8 :]
            body = body[: len(body) // 2 * 2]
            return np.frombuffer(body, "<i2").astype(np.int16), sample_rate
        pos += 8 + size + (size & 1)
    raise EspeakError("espeak-ng WAV stream has no data chunk")


def synthesize(
    text: str,
    *,
    voice: str = "en-us",
    variant: str | None = None,
    pitch: int = 50,
    pitch_range: int = 50,
    rate: int = 175,
    volume: int = 100,
    seed: int = 0,
) -> tuple[np.ndarray, int]:
    """Speak ``text`` with eSpeak NG; return ``(samples, sample_rate)``.

    ``samples`` is float32 mono in [-1, 1] at eSpeak's native rate (22050 Hz for the
    bundled voices). ``voice`` is an eSpeak voice name such as ``"en-us"``; ``variant`` a
    voice variant such as ``"f3"`` or ``"m7"`` (or pass ``voice="en-us+f3"``). ``pitch`` and
    ``pitch_range`` are 0-100 (50 = voice default), ``rate`` is words per minute (80-450),
    ``volume`` is amplitude 0-200 (100 = normal). ``seed`` seeds eSpeak's noise generator
    (breath/aspiration); with the ctypes backend the result is a pure function of the
    arguments. The binary fallback cannot be seeded and is not bit-reproducible.
    """
    _check_args(text, pitch, pitch_range, rate, volume)
    name = _voice_name(voice, variant)
    try:
        wheel = _locate_wheel()
    except EspeakError as exc:
        exe = shutil.which("espeak-ng")
        if exe is None:
            raise EspeakError(f"{exc} (no `espeak-ng` binary on PATH either)") from exc
        pcm, sample_rate = _synth_binary(exe, text, name, pitch, pitch_range, rate, volume)
    else:
        if "+" in name:
            var = name.split("+", 1)[1]
            # eSpeak silently ignores an unknown variant; refuse it instead.
            if not (wheel.data_path / "voices" / "!v" / var).is_file():
                raise ValueError(
                    f"unknown eSpeak variant {var!r} (see serlens.corpus.espeak.available_variants())"
                )
        params = {_RATE: rate, _VOLUME: volume, _PITCH: pitch, _RANGE: pitch_range}
        with _lock:
            pcm, sample_rate = _synth_ctypes(
                wheel, text.encode("utf-8"), name, params, int(seed) % (2**31)
            )
    if pcm.size == 0:
        raise EspeakError(f"eSpeak NG produced no audio for {text!r} with voice {name!r}")
    return (pcm.astype(np.float32) / np.float32(32768.0)), int(sample_rate)
