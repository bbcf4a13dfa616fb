"""The workflow stays clean for its readers: snakemake --lint, snakefmt, ruff."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True)


def test_snakemake_lint_is_clean():
    proc = run(sys.executable, "-m", "snakemake", "--lint")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Lints for" not in out, out[-4000:]


def test_snakefmt_and_ruff_are_clean():
    for args in (
        (str(BIN / "snakefmt"), "--check", "workflow/"),
        (str(BIN / "ruff"), "check", "."),
        (str(BIN / "ruff"), "format", "--check", "."),
    ):
        proc = run(*args)
        assert proc.returncode == 0, (
            f"{' '.join(args)}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
