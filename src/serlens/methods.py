"""Training methods: one place that owns their names, their parsing and what each one reads.

A *method* is how a run adapts Whisper to emotion. Every method has a name that is a path
component (``results/{corpus}/train/{model}/{method}/seed{seed}/fold{fold}``) and a
:class:`Method` that says what the run trains and what the analyses may ask of it. The rest
of the workflow asks these objects (``method.has_adapter``, ``method.uses_features``), never
the name's spelling.

Methods today:

* ``frozen``: the encoder frozen, a head on the last layer's pooled state (trained on the
  cached features).
* ``frozen_wsum``: the encoder frozen, a head on a learned softmax-weighted sum of every
  layer's pooled state (SUPERB's weighted-sum probe; trained on the cached features).
* ``lora_r{rank}``: peft LoRA on the encoder's ``lora.target_modules`` of every layer, alpha
  = ``lora.alpha_per_rank`` x rank, dropout ``lora.dropout``, the head trained jointly.

Adding a method is one entry in :data:`KINDS` (its kind, how names of that kind are built and
parsed, what it reads from the config); the rules, paths, tables and figures follow from it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from serlens.errors import ConfigError

# The keys of config["train"] every run reads, and those each family of runs reads on top.
SHARED_TRAIN_KEYS = ("weight_decay", "warmup_fraction", "grad_clip", "balance", "head_proj_size")
HEAD_TRAIN_KEYS = ("frozen_epochs", "frozen_lr", "frozen_batch_size", "frozen_patience")
ENCODER_TRAIN_KEYS = ("batch_size", "epochs", "patience", "lr")
LORA_KEYS = ("target_modules", "alpha_per_rank", "dropout")


@dataclass(frozen=True)
class Method:
    """One training method of the grid.

    ``kind`` is the family (a key of :data:`KINDS`); ``readout`` the head's input (``last``:
    the last layer's pooled state, ``wsum``: the weighted sum of all layers); ``rank`` the
    LoRA rank (None for methods without an adapter).
    """

    name: str
    kind: str
    readout: str = "last"
    rank: int | None = None

    @property
    def has_adapter(self) -> bool:
        """The run holds a low-rank update of the encoder (``adapter/``)."""
        return self.kind == "lora"

    @property
    def trains_encoder(self) -> bool:
        return self.kind == "lora"

    @property
    def uses_features(self) -> bool:
        """Trained on the cached pooled features of the frozen encoder (no encoder in the loop)."""
        return not self.trains_encoder

    @property
    def encoder_variant(self) -> str:
        """Whose encoder states the run's analyses read: its own name, or ``base`` (pre-trained)."""
        return self.name if self.trains_encoder else "base"

    def train_settings(self, config: dict) -> dict:
        """Exactly what the run's training reads: the rule passes it, the code reads only it."""
        return KINDS[self.kind].settings(self, config)


@dataclass(frozen=True)
class MethodKind:
    """A family of methods: how its names look and what its runs read from the config."""

    pattern: str  # regular expression of the names of this kind
    build: Callable[[re.Match], Method]
    settings: Callable[[Method, dict], dict]
    describe: str


def _train(config: dict, keys: tuple[str, ...]) -> dict:
    return {key: config["train"][key] for key in (*SHARED_TRAIN_KEYS, *keys)}


def _head_settings(method: Method, config: dict) -> dict:
    return {"train": _train(config, HEAD_TRAIN_KEYS)}


def _lora_settings(method: Method, config: dict) -> dict:
    return {
        "train": _train(config, ENCODER_TRAIN_KEYS),
        "lora": {k: config["lora"][k] for k in LORA_KEYS},  # the rank is in the method's name
        "audio": dict(config["audio"]),
    }


KINDS: dict[str, MethodKind] = {
    "frozen": MethodKind(
        r"frozen",
        lambda m: Method("frozen", "frozen", readout="last"),
        _head_settings,
        "frozen encoder, head on the last layer",
    ),
    "frozen_wsum": MethodKind(
        r"frozen_wsum",
        lambda m: Method("frozen_wsum", "frozen_wsum", readout="wsum"),
        _head_settings,
        "frozen encoder, head on a learned weighted sum of all layers",
    ),
    "lora": MethodKind(
        r"lora_r(?P<rank>[1-9]\d*)",
        lambda m: Method(m[0], "lora", rank=int(m["rank"])),
        _lora_settings,
        "LoRA of rank <rank> on lora.target_modules, head trained jointly",
    ),
}


def parse_method(name: str) -> Method:
    """The :class:`Method` a name stands for; ConfigError naming the allowed forms otherwise."""
    for kind in KINDS.values():
        match = re.fullmatch(kind.pattern, name)
        if match:
            return kind.build(match)
    forms = ", ".join(f"{k.pattern!r} ({k.describe})" for k in KINDS.values())
    raise ConfigError(f"method {name!r} is not understood; allowed forms: {forms}")


def configured_methods(config: dict) -> dict[str, Method]:
    """Every method of the configured grid, in report order: frozen heads, then LoRA by rank."""
    names = [
        "frozen",
        "frozen_wsum",
        *(f"lora_r{rank}" for rank in sorted(config["lora"]["ranks"])),
    ]
    return {name: parse_method(name) for name in names}


def method_label(name: str) -> str:
    """How a method is written in figures: ``frozen, last layer``, ``LoRA r = 8``."""
    method = parse_method(name)
    if method.kind == "lora":
        return f"LoRA r = {method.rank}"
    return {"last": "frozen, last layer", "wsum": "frozen, weighted sum"}[method.readout]


def method_sort_key(name: str) -> tuple[int, int]:
    """Frozen heads first (last layer, weighted sum), then LoRA by rank."""
    method = parse_method(name)
    if method.kind == "lora":
        return (2, method.rank or 0)
    return (0 if method.readout == "last" else 1, 0)
