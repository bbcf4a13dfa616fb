"""Training methods: one place that owns their names, their specs and what each one reads.

A *method* is how a run adapts Whisper to emotion. Every method has a name that is a path
component (``results/{corpus}/train/{model}/{method}/seed{seed}/fold{fold}``) and a
:class:`Method` that says what the run trains and what the analyses may ask of it. The rest
of the workflow asks these objects (``method.has_adapter``, ``method.has_update``,
``method.uses_features``), never the name's spelling.

Kinds (``methods.<name>.kind`` in the config):

* ``frozen``: the encoder frozen, a head on the cached pooled features; ``readout: last``
  (the last layer's pooled state) or ``wsum`` (SUPERB's learned softmax-weighted sum of every
  layer's pooled state).
* ``lora``: peft LoRA of rank ``rank`` on ``targets`` (peft ``target_modules``) of the
  encoder layers ``layers`` (``all``, ``first_half``, ``last_half`` or a list of indices:
  peft ``layers_to_transform``), alpha = ``lora.alpha_per_rank`` x rank, dropout
  ``lora.dropout``; the head trained jointly.
* ``dora``: the same with peft's ``use_dora`` (Liu et al. 2024, "DoRA: Weight-Decomposed
  Low-Rank Adaptation"): W' = m * (W0 + s B A) / ||W0 + s B A||_c, a trained magnitude
  vector m over the column norms.
* ``full``: every encoder weight trains (learning rate ``lr``, required: full fine-tuning
  diverges at LoRA's rates).

A method of an encoder-training kind may name a *protocol* (``methods.<name>.protocol``): the
deviations of the paper's published code (github.com/harryporry77/Behind-the-Scenes,
``train_lora.py``) that need their own training, applied to an otherwise identical honest
method (:data:`DEVIATIONS`; ``paper`` = all of them). Such a run is trained and tested only
to measure what its protocol adds (``protocol_gap.tsv``, :mod:`serlens.report.protocol`);
the analyses, the performance tables and the claims read honest runs only.

The short form is what the grid always holds: ``frozen`` and ``frozen_wsum`` (the baselines
every comparison is read against) and ``lora_r{rank}`` for each of ``lora.ranks`` on
``lora.target_modules`` of every layer. ``methods:`` adds named specs to it; a declared name
equal to a short-form name must mean the same run. Short-form runs keep the settings (so
the paths and rerun triggers) they had before ``methods:`` existed.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from serlens.errors import ConfigError

# The keys of config["train"] every run reads, and those each family of runs reads on top.
SHARED_TRAIN_KEYS = ("weight_decay", "warmup_fraction", "grad_clip", "balance", "head_proj_size")
HEAD_TRAIN_KEYS = ("frozen_epochs", "frozen_lr", "frozen_batch_size", "frozen_patience")
ENCODER_TRAIN_KEYS = ("batch_size", "epochs", "patience", "lr")
LORA_KEYS = ("target_modules", "alpha_per_rank", "dropout")

KINDS = ("frozen", "lora", "dora", "full")
#: The linear modules of a Whisper encoder layer an adapter may target.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
LAYER_SETS = ("all", "first_half", "last_half")
#: Names a method may not take: ``base`` is the pre-trained encoder's pass, ``lora`` the
#: cross-rank analyses' folder.
RESERVED = ("base", "lora")
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
#: The paper's protocol deviations that need their own training runs (the ones read off the
#: honest runs, such as test-fold checkpoint selection, are in serlens.report.protocol).
DEVIATIONS = {
    "prefix_folds": "folds by dialog prefix (Ses01F, Ses01M, ...: both actors of a session, "
    "and its scripts, in train and test), as the paper's code forms them",
    "pad30": "every clip padded to 30 s (Whisper's input), pooled over its audio frames",
    "pad30_all_frames": "every clip padded to 30 s and pooled over all 1500 frames, padding "
    "included (WhisperForAudioClassification, as the paper trains)",
}
#: ``protocol: paper``: every deviation of the paper's training (pad30_all_frames includes pad30).
PAPER_PROTOCOL = ("prefix_folds", "pad30_all_frames")


@dataclass(frozen=True)
class Method:
    """One training method of the grid.

    ``kind`` is one of :data:`KINDS`; ``readout`` the head's input (``last``: the last
    layer's pooled state, ``wsum``: the weighted sum of all layers); ``rank`` the adapter's
    rank (None without one); ``targets`` the adapted modules (full fine-tuning: the modules
    whose update ΔW the weight analyses read); ``layers`` which encoder layers are adapted;
    ``lr`` the peak learning rate when it is not ``train.lr``; ``short``: a short-form method.
    """

    name: str
    kind: str
    readout: str = "last"
    rank: int | None = None
    targets: tuple[str, ...] = ()
    layers: str | tuple[int, ...] = "all"
    lr: float | None = None
    short: bool = False
    protocol: tuple[str, ...] = ()

    @property
    def honest(self) -> bool:
        """Trained under the honest protocol (no deviation of the paper's code)."""
        return not self.protocol

    @property
    def prefix_folds(self) -> bool:
        """Trained on the paper's dialog-prefix folds (``folds_prefix.tsv``)."""
        return "prefix_folds" in self.protocol

    @property
    def input_policy(self) -> str | None:
        """The input policy its protocol imposes (``pad30``), or None: ``audio.input_policy``."""
        return "pad30" if {"pad30", "pad30_all_frames"} & set(self.protocol) else None

    @property
    def pools_all_frames(self) -> bool:
        """The head pools every encoder frame, padding included (the paper's classifier)."""
        return "pad30_all_frames" in self.protocol

    @property
    def counterpart_key(self) -> tuple:
        """What an honest method must share with this one to be its counterpart."""
        return (self.kind, self.readout, self.rank, self.targets, self.layers, self.lr)

    @property
    def has_adapter(self) -> bool:
        """The run holds a peft adapter (``adapter/``, ``adapter_epochs/``)."""
        return self.kind in ("lora", "dora")

    @property
    def has_update(self) -> bool:
        """The run changes encoder weights, so it has an update ΔW the weight analyses read."""
        return self.kind in ("lora", "dora", "full")

    @property
    def trains_encoder(self) -> bool:
        return self.kind != "frozen"

    @property
    def uses_features(self) -> bool:
        """Trained on the cached pooled features of the frozen encoder (no encoder in the loop)."""
        return self.kind == "frozen"

    @property
    def in_rank_family(self) -> bool:
        """A short-form LoRA run: the runs the cross-rank analyses compare."""
        return self.kind == "lora" and self.short

    @property
    def encoder_variant(self) -> str:
        """Whose encoder states the run's analyses read: its own name, or ``base`` (pre-trained)."""
        return self.name if self.trains_encoder else "base"

    @property
    def label(self) -> str:
        """How the method is written in figures: ``frozen, last layer``, ``LoRA r = 8``."""
        if self.kind == "frozen":
            return {"last": "frozen, last layer", "wsum": "frozen, weighted sum"}[self.readout]
        if self.short:
            return f"LoRA r = {self.rank}"
        if self.kind == "full":
            return "full fine-tuning" + self.protocol_label
        kind = {"lora": "LoRA", "dora": "DoRA"}[self.kind]
        short = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "o"}
        where = (
            "all modules"
            if set(self.targets) == set(TARGET_MODULES)
            else "+".join(short.get(t, t) for t in self.targets)
        )
        if isinstance(self.layers, str):
            layers = "" if self.layers == "all" else f", {self.layers.replace('_', ' ')}"
        else:
            layers = ", layers " + ",".join(map(str, self.layers))
        return f"{kind} r = {self.rank} ({where}{layers})" + self.protocol_label

    @property
    def protocol_label(self) -> str:
        if self.honest:
            return ""
        if self.protocol == PAPER_PROTOCOL:
            return ", paper protocol"
        return ", " + " + ".join(self.protocol)

    def spec(self) -> dict:
        """The method as the run's settings carry it (plain values, JSON-able)."""
        out = asdict(self)
        out["targets"] = list(self.targets)
        out["layers"] = self.layers if isinstance(self.layers, str) else list(self.layers)
        del out["protocol"]
        if self.protocol:  # absent when honest: declared runs keep the settings they had
            out["protocol"] = list(self.protocol)
        return out

    def layer_indices(self, n_layers: int) -> list[int]:
        """The adapted layers of an encoder of ``n_layers``; ConfigError for an index it lacks."""
        if self.layers == "all":
            return list(range(n_layers))
        if self.layers == "first_half":
            return list(range(n_layers // 2))
        if self.layers == "last_half":
            return list(range(n_layers // 2, n_layers))
        bad = [i for i in self.layers if not 0 <= i < n_layers]
        if bad:
            raise ConfigError(
                f"methods.{self.name}.layers: {bad} are not layers of this encoder, which has "
                f"{n_layers} (0-{n_layers - 1}); use indices in that range, first_half or last_half"
            )
        return sorted(self.layers)

    def train_settings(self, config: dict) -> dict:
        """Exactly what the run's training reads: the rule passes it, the code reads only it.

        Short-form runs carry what they always did (the rank is in the name); declared ones
        carry their spec under ``method`` on top.
        """
        if self.kind == "frozen":
            settings = {"train": _train(config, HEAD_TRAIN_KEYS)}
            if not self.short:
                settings["method"] = self.spec()
            return settings
        settings = {
            "train": _train(config, ENCODER_TRAIN_KEYS),
            "lora": {k: config["lora"][k] for k in LORA_KEYS},
            "audio": dict(config["audio"]),
        }
        if not self.short:
            settings["lora"]["target_modules"] = list(self.targets)
            settings["method"] = self.spec()
            if self.lr is not None:  # its own rate: train.lr is not read
                del settings["train"]["lr"]
            if self.kind == "full":  # no adapter: lora.* is not read
                del settings["lora"]
        return settings

    @classmethod
    def from_settings(cls, name: str, settings: dict) -> Method:
        """The method a training job's settings describe (declared spec, or the short form)."""
        if "method" in settings:
            spec = dict(settings["method"])
            spec["targets"] = tuple(spec["targets"])
            if not isinstance(spec["layers"], str):
                spec["layers"] = tuple(spec["layers"])
            spec["protocol"] = tuple(spec.get("protocol", ()))
            return cls(**spec)
        method = short_form(name)
        if method.kind == "lora":
            targets = tuple(settings["lora"]["target_modules"])
            return Method(name, "lora", rank=method.rank, targets=targets, short=True)
        return method


def _train(config: dict, keys: tuple[str, ...]) -> dict:
    return {key: config["train"][key] for key in (*SHARED_TRAIN_KEYS, *keys)}


def short_form(name: str, targets: tuple[str, ...] = ("v_proj",)) -> Method:
    """The short-form method a name spells (``frozen``, ``frozen_wsum``, ``lora_r<rank>``)."""
    if name == "frozen":
        return Method("frozen", "frozen", readout="last", short=True)
    if name == "frozen_wsum":
        return Method("frozen_wsum", "frozen", readout="wsum", short=True)
    match = re.fullmatch(r"lora_r(?P<rank>[1-9]\d*)", name)
    if match:
        return Method(name, "lora", rank=int(match["rank"]), targets=tuple(targets), short=True)
    raise ConfigError(
        f"method {name!r} is not understood: short-form names are frozen, frozen_wsum and "
        "lora_r<rank>; declare any other under methods: (kinds: " + ", ".join(KINDS) + ")"
    )


def declared_method(name: str, spec: dict, config: dict) -> Method:
    """A ``methods:`` entry as a :class:`Method`; ConfigError naming the key and what is allowed."""
    where = f"methods.{name}"
    if not re.fullmatch(NAME_PATTERN, name) or name in RESERVED:
        raise ConfigError(
            f"{where}: a method name is a path component: letters, digits, _ . - "
            f"(not {', '.join(RESERVED)})"
        )
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind: {kind!r} is not a kind; allowed: {', '.join(KINDS)}")
    allowed = {
        "frozen": {"kind", "readout"},
        "lora": {"kind", "rank", "targets", "layers", "lr", "protocol"},
        "dora": {"kind", "rank", "targets", "layers", "lr", "protocol"},
        "full": {"kind", "targets", "lr", "protocol"},
    }[kind]
    extra = sorted(set(spec) - allowed)
    if extra:
        raise ConfigError(
            f"{where}: {extra} do not apply to kind {kind}; it takes {sorted(allowed)}"
        )
    if kind == "frozen":
        return Method(name, "frozen", readout=spec.get("readout", "last"))
    targets = tuple(spec.get("targets") or config["lora"]["target_modules"])
    unknown = [t for t in targets if t not in TARGET_MODULES]
    if unknown:
        raise ConfigError(
            f"{where}.targets: {unknown} are not modules of a Whisper encoder layer; "
            f"allowed: {', '.join(TARGET_MODULES)}"
        )
    protocol = parse_protocol(spec.get("protocol"), where)
    if kind == "full":
        if "lr" not in spec:
            raise ConfigError(
                f"{where}.lr: full fine-tuning needs its own learning rate (it diverges at "
                f"LoRA's train.lr = {config['train']['lr']}); e.g. lr: 1.0e-5"
            )
        return Method(name, "full", targets=targets, lr=float(spec["lr"]), protocol=protocol)
    if "rank" not in spec:
        raise ConfigError(f"{where}.rank: kind {kind} needs a rank (an integer >= 1)")
    layers = spec.get("layers", "all")
    if isinstance(layers, str):
        if layers not in LAYER_SETS:
            raise ConfigError(
                f"{where}.layers: {layers!r} is not understood; use {', '.join(LAYER_SETS)} "
                "or a list of layer indices"
            )
    else:
        layers = tuple(sorted({int(i) for i in layers}))
        if not layers:
            raise ConfigError(f"{where}.layers: the list is empty; name at least one layer")
    lr = float(spec["lr"]) if "lr" in spec else None
    return Method(
        name,
        kind,
        rank=int(spec["rank"]),
        targets=targets,
        layers=layers,
        lr=lr,
        protocol=protocol,
    )


def parse_protocol(value, where: str) -> tuple[str, ...]:
    """``methods.<name>.protocol``: ``paper`` or a list of :data:`DEVIATIONS`, in that order."""
    if value is None or value == []:
        return ()
    if value == "paper":
        return PAPER_PROTOCOL
    names = [value] if isinstance(value, str) else list(value)
    unknown = [v for v in names if v not in DEVIATIONS]
    if unknown:
        raise ConfigError(
            f"{where}.protocol: {unknown} are not deviations of the paper's protocol; allowed: "
            f"paper (all of them) or a list of {', '.join(DEVIATIONS)}"
        )
    if {"pad30", "pad30_all_frames"} <= set(names):
        raise ConfigError(
            f"{where}.protocol: pad30_all_frames already pads to 30 s; list pad30 or "
            "pad30_all_frames, not both"
        )
    return tuple(d for d in DEVIATIONS if d in names)


def honest_counterpart(method: Method, methods: dict[str, Method]) -> Method:
    """The honest method of the grid that ``method`` (with a protocol) is compared with: the
    same kind, readout, rank, targets, layers and lr; ConfigError naming the key otherwise."""
    for other in methods.values():
        if other.honest and other.counterpart_key == method.counterpart_key:
            return other
    raise ConfigError(
        f"methods.{method.name}.protocol: its gap is measured against the same method under "
        "the honest protocol, which the grid lacks; add it (a lora_r<rank> of lora.ranks, or "
        f"a methods: entry with the same spec and no protocol)"
    )


def configured_methods(config: dict) -> dict[str, Method]:
    """Every method of the configured grid, in report order: the frozen heads, LoRA by rank
    (the short form), then the declared methods in their config order."""
    targets = tuple(config["lora"]["target_modules"])
    short = {
        name: short_form(name, targets)
        for name in (
            "frozen",
            "frozen_wsum",
            *(f"lora_r{r}" for r in sorted(config["lora"]["ranks"])),
        )
    }
    methods = dict(short)
    for name, spec in (config.get("methods") or {}).items():
        method = declared_method(name, dict(spec), config)
        if name in short:
            same = short[name]
            if (method.kind, method.readout, method.rank, method.targets, method.layers) != (
                same.kind,
                same.readout,
                same.rank,
                same.targets,
                same.layers,
            ) or method.lr is not None:
                raise ConfigError(
                    f"methods.{name}: {name} is a short-form name (lora.ranks and the frozen "
                    "heads) with another meaning; give this method another name"
                )
            continue
        methods[name] = method
    for method in methods.values():
        if not method.honest:
            honest_counterpart(method, methods)
    return methods


# The grid's methods, declared by the workflow (workflow/rules/common.smk) so that code run
# in its process can look a declared name up; short-form names parse without it.
_DECLARED: dict[str, Method] = {}


def declare(methods: dict[str, Method]) -> None:
    _DECLARED.clear()
    _DECLARED.update(methods)


def parse_method(name: str) -> Method:
    """The :class:`Method` of a name: a declared one, or the short form; ConfigError otherwise."""
    if name in _DECLARED:
        return _DECLARED[name]
    return short_form(name)


def method_label(name: str) -> str:
    """How a method is written in figures: ``frozen, last layer``, ``LoRA r = 8``."""
    return parse_method(name).label


KIND_ORDER = {"frozen": 0, "lora": 2, "dora": 3, "full": 4}


def method_sort_key(name: str) -> tuple:
    """Frozen heads first (last layer, weighted sum), LoRA by rank, then the declared methods
    by kind (LoRA, DoRA, full) and name."""
    method = parse_method(name)
    if method.kind == "frozen":
        return (0 if method.readout == "last" else 1, 0, "")
    if method.short:
        return (2, method.rank or 0, "")
    return (3 + KIND_ORDER[method.kind], method.rank or 0, name)
