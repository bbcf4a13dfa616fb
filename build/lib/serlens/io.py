"""Writing outputs so a killed job never leaves a file that looks complete: write beside, then rename."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def _tmp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp")


def write_tsv_atomic(frame: pd.DataFrame, path: str | Path) -> None:
    path = Path(path)
    tmp = _tmp_beside(path)
    frame.to_csv(tmp, sep="\t", index=False)
    tmp.replace(path)


def write_json_atomic(obj: dict, path: str | Path) -> None:
    path = Path(path)
    tmp = _tmp_beside(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
