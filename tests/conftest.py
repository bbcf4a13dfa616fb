import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from serlens.analysis.runs import TrainedRun  # noqa: E402

CLASSES = ["neu", "hap", "ang", "sad"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    from serlens.models.resolve import resolve_weights

    converted = REPO / "resources" / "weights" / "tiny.en"
    if (converted / "config.json").is_file():  # already converted by the workflow; reuse it
        return converted
    return resolve_weights("bundled:tiny.en", tmp_path_factory.mktemp("resources"))


def _split(n, seed, prefix):
    """Tones whose pitch depends on the class, plus noise: 0.5 to 1.0 s clips."""
    from serlens.train.data import Split

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    waves, durations = [], []
    for label in labels:
        seconds = rng.uniform(0.5, 1.0)
        t = np.arange(int(seconds * 16000)) / 16000
        wave = 0.2 * np.sin(2 * np.pi * (140 + 70 * label) * t) + 0.02 * rng.standard_normal(len(t))
        waves.append(wave.astype(np.float32))
        durations.append(seconds)
    return Split(
        [f"{prefix}{i:03d}" for i in range(n)], labels, np.array(durations), [""] * n, waves
    )


@pytest.fixture(scope="session")
def lora_run(weights):
    """A LoRA run built directly: real tiny.en weights, rank-4 adapters with a non-zero (seeded) B."""
    from peft import get_peft_model

    from serlens.config import validate_config
    from serlens.models.encoder import load_encoder
    from serlens.train.heads import EmotionHead
    from serlens.train.lora import lora_config

    encoder = load_encoder(weights)
    for p in encoder.parameters():
        p.requires_grad_(False)
    peft_encoder = get_peft_model(encoder, lora_config(4, validate_config({})["lora"]))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_encoder.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            p.requires_grad_(False)
    peft_encoder.eval()
    torch.manual_seed(5)
    head = EmotionHead(encoder.config.d_model, len(CLASSES)).eval()
    splits = {"train": _split(8, 0, "tr"), "dev": _split(4, 1, "dv"), "test": _split(4, 2, "te")}
    return TrainedRun(
        model="tiny.en",
        method="lora_r4",
        fold=1,
        encoder=peft_encoder.base_model.model,
        head=head,
        splits=splits,
        classes=CLASSES,
        policy="crop",
        max_seconds=30.0,
        rank=4,
        peft_encoder=peft_encoder,
    )


#: The test files with end-to-end workflow runs, in the order they are started: ``make
#: test`` runs two pytest workers (``-n 2 --dist loadfile --no-loadscope-reorder``), and
#: starting the long runs first lets the short tests fill the other worker instead of
#: waiting for them at the end. The EmoDB tier and the SLURM test go to the first worker
#: one after the other (each runs snakemake on both cores); the workflow tests to the second.
LONG_FILES = ("test_real.py", "test_workflow.py", "test_slurm.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))
