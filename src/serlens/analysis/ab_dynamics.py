"""Activations and gradients of LoRA's A and B ("forward alignment, backward differentiation").

For an adapted linear module with frozen weight ``W`` (``d_out x d_in``), input frame ``x``
and PEFT's adapter ``A`` (``r x d_in``, ``lora_A``), ``B`` (``d_out x r``, ``lora_B``),
scale ``s = alpha / r`` (Hu et al. 2021, "LoRA", §4.1)::

    a = A x          (the r-dimensional code: output of lora_A)
    b = B a          (output of lora_B)
    y = W x + s b    (the module's output)

With ``g_y = ∂L/∂y`` per frame, ``g_b = ∂L/∂b = s g_y`` and ``g_a = ∂L/∂a = Bᵀ g_b``. Summing
over frames, the gradient of the full weight is ``G = ∂L/∂W = Σ g_y xᵀ`` and the chain rule
gives the factor gradients (:func:`lora_factor_gradients`)::

    ∂L/∂A = s Bᵀ G        ∂L/∂B = s G Aᵀ

A gradient step of size η on A alone changes ``ΔW = s B A`` by ``-η s B ∂L/∂A = -η s² B Bᵀ G``;
on B alone by ``-η s ∂L/∂B A = -η s² G Aᵀ A`` (to first order; :func:`delta_w_from_factor_steps`).
(ΔW is linear in each factor, so this is exact for a step on one factor.) Their norms and
the cosine between them (:func:`delta_w_comparison`) compare what A and B contribute to the
update, for the "forward alignment, backward differentiation" finding of the paper behind
this project ("Behind the Scenes: mechanistic interpretability of LoRA-adapted Whisper for
speech emotion recognition"). Both are computed from the accumulated ``∂L/∂A`` and ``∂L/∂B``
(``r x d_in`` and ``d_out x r``), so ``G`` (``d_out x d_in``) is never accumulated.

Energy ranks
------------
The number of directions of a ``frames x dims`` matrix ``M`` is its energy rank
(:func:`serlens.analysis.spectra.energy_rank`: the fewest singular directions holding
``energy_fraction`` of ``‖M‖²_F``). Two versions are reported:

* uncentred, on the singular values of ``M`` itself: the square roots of the eigenvalues of
  the ``dims x dims`` Gram ``G = MᵀM = Σ_batches M_bᵀ M_b``;
* centred, on those of ``M - 1 μᵀ`` (``μ`` the mean frame): the eigenvalues of
  ``G_c = G - n μ μᵀ = G - s sᵀ / n`` with ``s = Σ_t x_t`` (``= (n - 1) x`` the sample
  covariance). A shared offset of every frame is one direction holding most of the
  uncentred energy (offset + isotropic noise has uncentred rank 1 and a centred rank near
  ``energy_fraction · dims``), so only the centred rank counts directions of *variation*.

:class:`GramAccumulator` keeps ``G``, ``s`` and ``n`` (float64), so memory does not grow with
the number of frames. The B output ``b = a Bᵀ`` needs no accumulator of its own: its Gram is
``B G_a Bᵀ`` and its centred Gram ``B G_{a,c} Bᵀ`` (B is fixed during the pass; its mean is
``B μ_a``), whose non-zero eigenvalues are those of an ``r x r`` matrix
(:func:`product_singular_values`).

Counts live in spaces of different size: the A code and ``∂L/∂a`` are r-dimensional, ``b``
is d_out-dimensional but has rank at most r (it is ``B a``), ``∂L/∂b`` is d_out-dimensional
with no such bound. Each count is therefore also reported as a share of the largest rank
its matrix can have, ``max_rank = min(n_frames, len(σ))`` uncentred and
``min(n_frames - 1, len(σ))`` centred, with ``len(σ) = r`` for ``a``, ``b`` and ``∂L/∂a``
and ``d_out`` for ``∂L/∂b`` (``{quantity}_frac``, ``{quantity}_centred_frac``). A white
(isotropic) matrix has a share of about ``energy_fraction``; one direction is
``1 / max_rank``. "A compresses, B keeps diversity" is a statement about these shares, and
about the centred ones, not about raw counts in spaces of different dimension.

The CKA between the A-code and the B-output gradient (:func:`serlens.analysis.cka.linear_cka`)
uses a seeded uniform reservoir of frames (:class:`FrameReservoir`; Vitter 1985, "Random
sampling with a reservoir", Algorithm R).

Untrained baselines
-------------------
Every quantity is computed for the trained adapters and head of a run and for an untrained
baseline on the same frames (``state`` trained / untrained; ``ratio`` = trained ÷ untrained).
``analysis.untrained_baseline`` chooses it (:func:`untrained_state`):

* ``matched_scale`` (default; :func:`matched_scale_state`): the run's *trained head* is
  kept (the same module, weights bit-identical), and per adapted module (so per layer)::

      A_u = ‖A‖_F · Z_A / ‖Z_A‖_F        B_u = ‖B‖_F · Z_B / ‖Z_B‖_F

  with ``Z_A`` (``r x d_in``), ``Z_B`` (``d_out x r``) seeded standard normal draws and
  ``A``, ``B`` the trained factors of that module. The baseline has the trained Frobenius
  norms of A and of B, layer by layer, and isotropic random directions. Gradient norms are
  scale-covariant (``∂L/∂A = s Bᵀ G`` scales with ‖B‖, ``∂L/∂B = s G Aᵀ`` with ‖A‖), so
  trained ÷ untrained compares *structure* (directions, alignment with the data and the
  head), not scale: rebalancing ``A → cA, B → B/c`` leaves ΔW and the function unchanged, and
  leaves every trained ÷ untrained ratio unchanged too. The head is kept so that the
  loss, hence ``G``, is the trained task's and not that of a random classifier.
* ``paper``: the baseline of the paper's code, ``A, B ~ N(0, untrained_init_std²)`` and a
  freshly initialised head. Its gradient norms scale with the arbitrary
  ``untrained_init_std`` (``‖∂L/∂A‖ ∝ ‖B‖``, ``‖∂L/∂B‖ ∝ ‖A‖``), so its trained ÷ untrained
  ratios mostly say how far the trained factors are from that scale (the project's earlier
  baseline, A at PEFT's init and B ~ N(0, std²), gave B/A gradient-norm ratios of 14.8,
  1.48, 0.148 for std 0.002, 0.02, 0.2); kept for the side-by-side comparison with the
  paper's numbers.

:func:`compute_ab_dynamics` runs this on a fixed class-balanced sample of training
utterances, counting only frames that hold audio.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from serlens.analysis.cka import linear_cka
from serlens.analysis.runs import TrainedRun, balanced_sample
from serlens.analysis.spectra import energy_rank
from serlens.models.encoder import masked_mean, run_encoder
from serlens.train.heads import EmotionHead

__all__ = [
    "BASELINES",
    "FrameReservoir",
    "GramAccumulator",
    "ab_statistics",
    "ab_table_from_statistics",
    "compute_ab_dynamics",
    "delta_w_comparison",
    "delta_w_from_factor_steps",
    "gram_singular_values",
    "lora_factor_gradients",
    "matched_scale_state",
    "paper_state",
    "product_singular_values",
    "stream_ab_statistics",
    "trained_state",
    "untrained_state",
]

ADAPTER = "default"
CKA_MAX_FRAMES = 2000
#: The untrained baselines (``analysis.untrained_baseline``; see the module docstring).
BASELINES = ("matched_scale", "paper")
#: Activation and gradient matrices whose singular values are stored (and energy ranks taken).
SPECTRA = ("a_out", "b_out", "a_out_grad", "b_out_grad")
ACTIVATIONS = SPECTRA
#: Quantities with a trained ÷ untrained row (counts: the shares have the same ratio).
RATIO_QUANTITIES = (
    *SPECTRA,
    *(f"{q}_centred" for q in SPECTRA),
    "grad_norm_A",
    "grad_norm_B",
    "grad_norm_ratio_B_A",
    "dW_from_A_norm",
    "dW_from_B_norm",
)
SCALARS = (
    "grad_norm_A",
    "grad_norm_B",
    "grad_norm_ratio_B_A",
    "dW_from_A_norm",
    "dW_from_B_norm",
    "dW_cos",
    "cka_a_code_vs_b_out_grad",
    "n_frames",
)
TABLE_COLUMNS = ["module", "layer", "depth", "quantity", "state", "value"]


# --------------------------------------------------------------------------- pure functions


def lora_factor_gradients(G: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float):
    """Gradients of the LoRA factors from the full-weight gradient ``G = ∂L/∂W`` (``d_out x d_in``).

    For ``y = W x + s B A x``: ``∂L/∂A = s Bᵀ G`` (``r x d_in``) and ``∂L/∂B = s G Aᵀ``
    (``d_out x r``), with ``A`` ``r x d_in`` and ``B`` ``d_out x r`` as PEFT stores them.
    """
    return scaling * B.T @ G, scaling * G @ A.T


def delta_w_from_factor_steps(
    grad_A: torch.Tensor, grad_B: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float
):
    """First-order change of ``ΔW = s B A`` per unit (negative) step on one factor alone.

    Step on A: ``s B ∂L/∂A = s² B Bᵀ G``; step on B: ``s ∂L/∂B A = s² G Aᵀ A`` (both
    ``d_out x d_in``; the descent direction is minus these).
    """
    return scaling * B @ grad_A, scaling * grad_B @ A


def delta_w_comparison(grad_A, grad_B, A, B, scaling: float) -> dict[str, float]:
    """Norms and cosine of the two ΔW contributions of :func:`delta_w_from_factor_steps`.

    ``dW_from_A_norm = ‖s² B Bᵀ G‖_F``, ``dW_from_B_norm = ‖s² G Aᵀ A‖_F`` and
    ``dW_cos = <s² B Bᵀ G, s² G Aᵀ A>_F / (‖·‖_F ‖·‖_F)`` (flattened cosine; nan when either
    is zero). Computed in float64.
    """
    grad_A, grad_B, A, B = (torch.as_tensor(t).to(torch.float64) for t in (grad_A, grad_B, A, B))
    from_A, from_B = delta_w_from_factor_steps(grad_A, grad_B, A, B, scaling)
    norm_A = float(torch.linalg.matrix_norm(from_A))
    norm_B = float(torch.linalg.matrix_norm(from_B))
    den = norm_A * norm_B
    cos = float((from_A * from_B).sum()) / den if den > 0 else math.nan
    return {"dW_from_A_norm": norm_A, "dW_from_B_norm": norm_B, "dW_cos": cos}


def gram_singular_values(gram) -> np.ndarray:
    """Singular values of ``M`` from its Gram ``MᵀM``: ``σ_i = sqrt(λ_i(MᵀM))``, descending.

    Eigenvalues that round-off pushes below zero are clipped to 0. (Eigenvalues in torch,
    float64: numpy's own BLAS threads would fight torch's for the same cores.)
    """
    gram = torch.as_tensor(gram).detach().to("cpu", torch.float64)
    eig = torch.linalg.eigvalsh((gram + gram.T) / 2.0)
    return np.sqrt(np.clip(eig.numpy(), 0.0, None))[::-1].copy()


def product_singular_values(gram_a, B) -> np.ndarray:
    """Singular values of ``b = a Bᵀ`` (frames x d_out) from ``aᵀa`` (r x r) and ``B`` (d_out x r).

    ``bᵀb = B (aᵀa) Bᵀ`` shares its non-zero eigenvalues with the r x r matrix
    ``C^½ BᵀB C^½`` (``C = aᵀa``, ``C^½`` its PSD square root), so only r x r
    eigenproblems are solved. Returns the ``r`` values, descending. Given the centred Gram
    of ``a`` it gives those of the centred ``b`` (the mean of ``b`` is ``B`` times that of ``a``).
    """
    C = torch.as_tensor(gram_a).detach().to("cpu", torch.float64)
    B = torch.as_tensor(B).detach().to("cpu", torch.float64)
    lam, V = torch.linalg.eigh((C + C.T) / 2.0)
    root = (V * lam.clamp(min=0.0).sqrt()) @ V.T
    return gram_singular_values(root @ (B.T @ B) @ root)


def max_rank(n_singular: int, n_frames: int, centred: bool) -> int:
    """The largest rank a ``frames x dims`` matrix with ``n_singular`` stored singular values
    can have: ``min(n_frames, n_singular)``, one less in frames once the mean is removed."""
    return max(0, min(int(n_frames) - (1 if centred else 0), int(n_singular)))


@dataclass
class GramAccumulator:
    """``MᵀM``, the column sums ``Σ_t x_t`` and the row count of a ``frames x dims`` matrix
    given in row blocks (float64): enough for its uncentred and centred spectra."""

    dims: int
    gram: torch.Tensor | None = None
    total: torch.Tensor | None = None
    n_rows: int = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(torch.float64)
        if rows.ndim != 2 or rows.shape[1] != self.dims:
            raise ValueError(f"expected rows of shape (n, {self.dims}); got {tuple(rows.shape)}")
        block, total = rows.T @ rows, rows.sum(dim=0)
        self.gram = block if self.gram is None else self.gram.add_(block)
        self.total = total if self.total is None else self.total.add_(total)
        self.n_rows += rows.shape[0]

    def centred_gram(self) -> torch.Tensor | None:
        """``Σ_t (x_t - μ)(x_t - μ)ᵀ = G - s sᵀ / n`` (``= (n - 1) ×`` the sample covariance).

        Exact algebra; in float64 the cancellation loses about ``log10(‖μ‖² / λ)`` of 16
        digits for a centred eigenvalue ``λ`` (per frame), harmless for activations.
        """
        if self.gram is None:
            return None
        return self.gram - torch.outer(self.total, self.total) / self.n_rows

    def singular_values(self, centred: bool = False) -> np.ndarray:
        if self.gram is None:
            return np.zeros(0)
        return gram_singular_values(self.centred_gram() if centred else self.gram)

    def energy_rank(self, fraction: float, centred: bool = False) -> int:
        """Energy rank of the stacked matrix (see :func:`serlens.analysis.spectra.energy_rank`)."""
        return energy_rank(self.singular_values(centred), fraction)


class FrameReservoir:
    """A uniform random sample of at most ``capacity`` frames from a stream (Algorithm R).

    Every call to :meth:`offer` passes row blocks of the same frames under several keys;
    all keys keep the same frames, so sampled representations stay paired row by row.
    Frame ``t`` (0-based, counted over the stream) fills slot ``t`` while ``t < capacity``,
    afterwards replaces slot ``j ~ U{0..t}`` when ``j < capacity`` (Vitter 1985).
    """

    def __init__(self, capacity: int, seed: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1; got {capacity}")
        self.capacity = int(capacity)
        self.rng = np.random.default_rng(seed)
        self.seen = 0
        self.buffers: dict = {}

    def _plan(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(slots, rows): row ``rows[i]`` of the block goes to slot ``slots[i]``."""
        t = self.seen + np.arange(n)
        slots = np.where(t < self.capacity, t, -1)
        late = t >= self.capacity
        slots[late] = self.rng.integers(0, t[late] + 1)
        self.seen += n
        keep = np.flatnonzero((slots >= 0) & (slots < self.capacity))
        # A slot hit twice in one block keeps the later frame, as a sequential pass would.
        _, last = np.unique(slots[keep][::-1], return_index=True)
        rows = keep[::-1][last]
        return slots[rows], rows

    def offer(self, blocks: dict) -> None:
        sizes = {b.shape[0] for b in blocks.values()}
        if len(sizes) != 1:
            raise ValueError(
                f"blocks offered together must have the same number of rows; got {sorted(sizes)}"
            )
        slots, rows = self._plan(sizes.pop())
        if len(rows) == 0:
            return
        slots_t, rows_t = torch.as_tensor(slots), torch.as_tensor(rows)
        for key, block in blocks.items():
            block = block.detach()
            if key not in self.buffers:
                self.buffers[key] = torch.zeros(
                    (self.capacity, block.shape[1]), dtype=block.dtype, device=block.device
                )
            self.buffers[key][slots_t.to(block.device)] = block[rows_t.to(block.device)]

    def sample(self, key) -> np.ndarray:
        """The sampled rows stored under ``key`` (``min(seen, capacity) x dims``, float64)."""
        return self.buffers[key][: min(self.seen, self.capacity)].cpu().numpy().astype(np.float64)


# --------------------------------------------------------------------------- adapters


def _layer_index(name: str) -> int:
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    if match is None:
        raise ValueError(
            f"adapted module {name!r} is not inside an encoder layer (no 'layers.<i>.' in its name)"
        )
    return int(match.group(1))


def _factors(module: nn.Module) -> tuple[nn.Linear, nn.Linear, float]:
    return module.lora_A[ADAPTER], module.lora_B[ADAPTER], float(module.scaling[ADAPTER])


@dataclass
class AdapterState:
    """One setting of every adapter (``weights[name] = (A, B)``) and the head that goes with it."""

    name: str
    head: nn.Module
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


def trained_state(run: TrainedRun) -> AdapterState:
    """The run's own adapters (copied) and head."""
    weights = {}
    for name, module in sorted(run.lora_modules().items()):
        lora_A, lora_B, _ = _factors(module)
        weights[name] = (lora_A.weight.detach().clone(), lora_B.weight.detach().clone())
    return AdapterState("trained", run.head, weights)


def _scaled_normal(like: torch.Tensor, norm: float, gen: torch.Generator) -> torch.Tensor:
    """A seeded standard normal of ``like``'s shape rescaled to Frobenius norm ``norm``."""
    z = torch.randn(like.shape, generator=gen, dtype=torch.float64)
    size = float(torch.linalg.matrix_norm(z))
    return (z * (norm / size if size > 0 else 0.0)).to(like)


def matched_scale_state(run: TrainedRun, seed: int) -> AdapterState:
    """The ``matched_scale`` baseline: the trained head, and per module random factors with
    the trained factors' Frobenius norms (see the module docstring).

    ``A_u = ‖A‖_F Z_A / ‖Z_A‖_F`` and ``B_u = ‖B‖_F Z_B / ‖Z_B‖_F``, ``Z`` standard normal
    from a generator seeded by ``seed`` (modules in name order, A then B), drawn in float64
    on the CPU and cast to the weights' dtype and device. The global random state is not
    touched. A trained B = 0 (an untrained run) gives B_u = 0.
    """
    gen = torch.Generator().manual_seed(int(seed))
    weights = {}
    for name, (A, B) in trained_state(run).weights.items():
        norm_A = float(torch.linalg.matrix_norm(A.double()))
        norm_B = float(torch.linalg.matrix_norm(B.double()))
        weights[name] = (_scaled_normal(A, norm_A, gen), _scaled_normal(B, norm_B, gen))
    return AdapterState("untrained", run.head, weights)


def paper_state(run: TrainedRun, init_std: float, seed: int) -> AdapterState:
    """The ``paper`` baseline: ``A, B ~ N(0, init_std²)`` and a fresh head, built aside.

    The head is a freshly initialised :class:`EmotionHead` of the run's head's shape. All
    seeded by ``seed`` (head first, then modules in name order, A then B) without disturbing
    the global random state.
    """
    device = run.head.projector.weight.device
    weights = {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int(seed))
        head = EmotionHead(
            run.head.projector.in_features,
            run.head.classifier.out_features,
            run.head.projector.out_features,
        )
        for name, module in sorted(run.lora_modules().items()):
            lora_A, lora_B, _ = _factors(module)
            fresh_A = torch.randn(lora_A.weight.shape) * init_std
            fresh_B = torch.randn(lora_B.weight.shape) * init_std
            weights[name] = (fresh_A.to(lora_A.weight), fresh_B.to(lora_B.weight))
    head = head.to(device).eval()
    for p in head.parameters():
        p.requires_grad_(False)
    return AdapterState("untrained", head, weights)


def untrained_state(
    run: TrainedRun, baseline: str, seed: int, init_std: float | None = None
) -> AdapterState:
    """The untrained baseline ``baseline`` (one of :data:`BASELINES`) for ``run``; the run
    is not touched. ``init_std`` is the std of the ``paper`` baseline (unused otherwise)."""
    if baseline == "matched_scale":
        return matched_scale_state(run, seed)
    if baseline == "paper":
        if init_std is None:
            raise ValueError("the paper baseline needs init_std (analysis.untrained_init_std)")
        return paper_state(run, float(init_std), seed)
    raise ValueError(f"untrained baseline {baseline!r} is not one of {BASELINES}")


def _load_adapters(
    modules: dict[str, nn.Module], weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    with torch.no_grad():
        for name, module in modules.items():
            lora_A, lora_B, _ = _factors(module)
            lora_A.weight.copy_(weights[name][0])
            lora_B.weight.copy_(weights[name][1])


@contextlib.contextmanager
def _adapters_restored(run: TrainedRun):
    """Whatever is loaded inside, the run's own adapter weights are back on exit (even on error)."""
    saved = trained_state(run).weights
    try:
        yield
    finally:
        _load_adapters(dict(sorted(run.lora_modules().items())), saved)


@contextlib.contextmanager
def _gradients_through_adapters(run: TrainedRun, heads: list[nn.Module]):
    """Eval mode (LoRA dropout off) and grad-enabled LoRA weights; both restored on exit."""
    modules = [run.encoder, *heads]
    training = [m.training for m in modules]
    weights = [
        w
        for m in run.lora_modules().values()
        for w in (_factors(m)[0].weight, _factors(m)[1].weight)
    ]
    flags = [w.requires_grad for w in weights]
    try:
        for m in modules:
            m.eval()
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for m, was in zip(modules, training, strict=True):
            m.train(was)
        for w, was in zip(weights, flags, strict=True):
            w.requires_grad_(was)


# --------------------------------------------------------------------------- the streaming pass


@dataclass
class ModuleAccumulators:
    """What one adapted module keeps over the sample; its size does not depend on the sample.

    ``a_out`` and ``b_out_grad`` hold the Gram, column sums and count of the code ``a``
    (frames x r) and of ``g_b`` (frames x d_out); ``a_out_grad`` those of ``g_a = g_b B``
    (frames x r). The (centred) Gram of ``b = a Bᵀ`` is ``B`` (centred ``aᵀa``) ``Bᵀ``
    (exact, B being fixed during the pass), so it needs no accumulator of its own.
    ``grad_A``, ``grad_B``: ∂L/∂A, ∂L/∂B summed over batches.
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    a_out: GramAccumulator
    a_out_grad: GramAccumulator
    b_out_grad: GramAccumulator
    grad_A: torch.Tensor
    grad_B: torch.Tensor

    @classmethod
    def for_weights(cls, A: torch.Tensor, B: torch.Tensor, scaling: float) -> ModuleAccumulators:
        r, d_out = A.shape[0], B.shape[0]
        return cls(
            A=A.detach().clone(),
            B=B.detach().clone(),
            scaling=scaling,
            a_out=GramAccumulator(r),
            a_out_grad=GramAccumulator(r),
            b_out_grad=GramAccumulator(d_out),
            grad_A=torch.zeros_like(A, dtype=torch.float64),
            grad_B=torch.zeros_like(B, dtype=torch.float64),
        )

    def b_out_singular_values(self, centred: bool = False) -> np.ndarray:
        if self.a_out.gram is None:
            return np.zeros(0)
        gram = self.a_out.centred_gram() if centred else self.a_out.gram
        return product_singular_values(gram, self.B)

    def spectra(self, centred: bool = False) -> dict[str, np.ndarray]:
        """Singular values of the four frames x dims matrices (of :data:`SPECTRA`)."""
        return {
            "a_out": self.a_out.singular_values(centred),
            "b_out": self.b_out_singular_values(centred),
            "a_out_grad": self.a_out_grad.singular_values(centred),
            "b_out_grad": self.b_out_grad.singular_values(centred),
        }

    def scalars(self) -> dict[str, float]:
        """Gradient norms, their ratio, the ΔW comparison and the number of frames."""
        values = {
            "grad_norm_A": float(torch.linalg.matrix_norm(self.grad_A)),
            "grad_norm_B": float(torch.linalg.matrix_norm(self.grad_B)),
        }
        values["grad_norm_ratio_B_A"] = (
            values["grad_norm_B"] / values["grad_norm_A"] if values["grad_norm_A"] > 0 else math.nan
        )
        values.update(delta_w_comparison(self.grad_A, self.grad_B, self.A, self.B, self.scaling))
        values["n_frames"] = float(self.a_out.n_rows)
        return values


@dataclass
class StateAccumulators:
    modules: dict[str, ModuleAccumulators]
    reservoir: FrameReservoir


def stream_ab_statistics(
    run: TrainedRun,
    states: list[AdapterState],
    indices: np.ndarray,
    batch_size: int,
    reservoir_frames: int,
    seed: int,
) -> dict[str, StateAccumulators]:
    """One log-mel per batch, then per state one forward + backward; per-module accumulators.

    Loss = mean cross-entropy of ``head(masked_mean(last_hidden_state))`` over the sample
    (the forward of ``LoraEmotionModel``; no class weights: the sample is balanced).
    Activations and their gradients count only frames that hold audio; the factor
    gradients are the exact autograd gradients of that loss. Each state's reservoir uses
    the same seed, so both sample the same frames.
    """
    modules = dict(sorted(run.lora_modules().items()))
    names = list(modules)
    train = run.splits["train"]
    device = next(run.encoder.parameters()).device
    acc = {
        state.name: StateAccumulators(
            {
                name: ModuleAccumulators.for_weights(
                    *state.weights[name], _factors(modules[name])[2]
                )
                for name in names
            },
            FrameReservoir(reservoir_frames, seed),
        )
        for state in states
    }
    captured: dict[tuple[str, str], torch.Tensor] = {}

    def keep(key):
        def hook(_module, _inputs, output):
            captured[key] = output

        return hook

    handles = []
    for name, module in modules.items():
        lora_A, lora_B, _ = _factors(module)
        handles.append(lora_A.register_forward_hook(keep((name, "a"))))
        handles.append(lora_B.register_forward_hook(keep((name, "b"))))
    labels = torch.as_tensor(train.labels)
    params = [
        w
        for name in names
        for w in (_factors(modules[name])[0].weight, _factors(modules[name])[1].weight)
    ]
    try:
        with _adapters_restored(run), _gradients_through_adapters(run, [s.head for s in states]):
            for idx, batch in run.batches(train, batch_size, indices):
                batch = batch.to(device)
                targets = labels[torch.as_tensor(idx)].to(device)
                mask = batch.frame_mask
                for state in states:
                    _load_adapters(modules, state.weights)
                    captured.clear()
                    out = run_encoder(run.encoder, batch)
                    logits = state.head(masked_mean(out.last_hidden_state, out.frame_mask))
                    loss = nn.functional.cross_entropy(
                        logits.float(), targets, reduction="sum"
                    ) / len(indices)
                    outputs = [captured[(name, part)] for name in names for part in ("a", "b")]
                    grads = torch.autograd.grad(loss, outputs + params)
                    state_acc = acc[state.name]
                    offered = {}
                    for i, name in enumerate(names):
                        code = outputs[2 * i].detach()[mask]
                        code_grad, out_grad = grads[2 * i][mask], grads[2 * i + 1][mask]
                        m_acc = state_acc.modules[name]
                        m_acc.a_out.add(code)
                        m_acc.a_out_grad.add(code_grad)
                        m_acc.b_out_grad.add(out_grad)
                        m_acc.grad_A += grads[len(outputs) + 2 * i]
                        m_acc.grad_B += grads[len(outputs) + 2 * i + 1]
                        offered[(name, "a_code")] = code
                        offered[(name, "b_out_grad")] = out_grad
                    state_acc.reservoir.offer(offered)
                    del out, logits, loss, outputs, grads, offered
                    captured.clear()
    finally:
        for h in handles:
            h.remove()
        captured.clear()
    return acc


# --------------------------------------------------------------------------- stored statistics


def _check_run(run: TrainedRun, indices) -> None:
    if not run.lora_modules():
        raise ValueError(
            f"{run.model}/{run.method}/fold{run.fold}: no LoRA modules; A/B dynamics apply to LoRA runs only"
        )
    if len(indices) == 0:
        raise ValueError(f"{run.model}/{run.method}/fold{run.fold}: the training sample is empty")


def ab_statistics(
    run: TrainedRun,
    indices: np.ndarray,
    batch_size: int,
    baseline: str,
    seed: int,
    init_std: float | None = None,
    cka_max_frames: int = CKA_MAX_FRAMES,
) -> dict[str, torch.Tensor]:
    """Everything the ``ab_dynamics`` table needs, with no post-hoc setting applied.

    ``baseline`` and ``init_std``: the untrained baseline (:func:`untrained_state`). Keys
    ``{state}/{module}/sv/{quantity}`` and ``{state}/{module}/sv_centred/{quantity}``: the
    singular values of each activation and gradient matrix, uncentred and centred (energy
    ranks are taken from them at any ``energy_fraction``), and ``{state}/{module}/{scalar}``:
    the gradient norms, the ΔW comparison, the CKA and ``n_frames``.
    """
    _check_run(run, indices)
    states = [trained_state(run), untrained_state(run, baseline, seed, init_std)]
    acc = stream_ab_statistics(run, states, indices, batch_size, cka_max_frames, seed)
    out = {}
    for state, state_acc in acc.items():
        for name, m_acc in state_acc.modules.items():
            for kind, centred in (("sv", False), ("sv_centred", True)):
                for quantity, sv in m_acc.spectra(centred).items():
                    out[f"{state}/{name}/{kind}/{quantity}"] = torch.from_numpy(
                        np.ascontiguousarray(sv)
                    )
            scalars = m_acc.scalars()
            code = state_acc.reservoir.sample((name, "a_code"))
            grad = state_acc.reservoir.sample((name, "b_out_grad"))
            scalars["cka_a_code_vs_b_out_grad"] = (
                linear_cka(code, grad) if code.shape[0] >= 2 else math.nan
            )
            for key, value in scalars.items():
                out[f"{state}/{name}/{key}"] = torch.tensor(float(value), dtype=torch.float64)
    return out


def write_ab_statistics(
    run: TrainedRun,
    indices,
    batch_size: int,
    baseline: str,
    seed: int,
    path,
    init_std: float | None = None,
) -> None:
    from pathlib import Path

    from safetensors.torch import save_file

    tensors = ab_statistics(run, indices, batch_size, baseline, seed, init_std)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    metadata = {
        "n_layers": str(len(run.encoder.layers)),
        "untrained_baseline": baseline,
        "untrained_init_std": "" if init_std is None or baseline != "paper" else str(init_std),
    }
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def _energy_values(sv: np.ndarray, n_frames: float, fraction: float, centred: bool):
    """(count, share of the largest possible rank) of one stored spectrum."""
    count = float(energy_rank(sv, fraction))
    if not np.isfinite(n_frames):
        return count, math.nan
    bound = max_rank(len(sv), int(n_frames), centred)
    return count, count / bound if bound > 0 else math.nan


def ab_table_from_statistics(tensors: dict, n_layers: int, energy_fraction: float) -> pd.DataFrame:
    """The ``ab_dynamics.tsv`` table from :func:`ab_statistics` (columns :data:`TABLE_COLUMNS`).

    Per adapted module and state (trained, untrained): for every ``q`` of :data:`SPECTRA`
    the energy ranks ``q`` (uncentred count), ``q_centred`` (count, mean removed),
    ``q_frac`` and ``q_centred_frac`` (the counts over the largest rank the matrix can have,
    :func:`max_rank`); then :data:`SCALARS`. ``ratio`` rows (trained ÷ untrained) for
    :data:`RATIO_QUANTITIES`. Statistics written before the centred spectra and the frame
    count were stored give the uncentred counts and the scalars only.
    """
    spectra: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    scalars: dict[str, dict[str, dict[str, float]]] = {}
    for key, tensor in tensors.items():
        state, rest = key.split("/", 1)
        for kind in ("sv", "sv_centred"):
            if f"/{kind}/" in rest:
                name, quantity = rest.split(f"/{kind}/")
                spectra.setdefault(state, {}).setdefault(name, {})[f"{kind}/{quantity}"] = (
                    np.asarray(tensor, dtype=np.float64)
                )
                break
        else:
            name, quantity = rest.rsplit("/", 1)
            scalars.setdefault(state, {}).setdefault(name, {})[quantity] = float(np.asarray(tensor))
    values: dict[str, dict[str, dict[str, float]]] = {}
    for state, by_module in scalars.items():
        for name, named in by_module.items():
            n_frames = named.get("n_frames", math.nan)
            out = values.setdefault(state, {}).setdefault(name, {})
            stored = spectra.get(state, {}).get(name, {})
            for q in SPECTRA:
                count, share = _energy_values(stored[f"sv/{q}"], n_frames, energy_fraction, False)
                out[q] = count
                if f"sv_centred/{q}" in stored:
                    c_count, c_share = _energy_values(
                        stored[f"sv_centred/{q}"], n_frames, energy_fraction, True
                    )
                    out[f"{q}_centred"] = c_count
                    out[f"{q}_frac"], out[f"{q}_centred_frac"] = share, c_share
            out.update({q: named[q] for q in SCALARS if q in named})
    order = [
        *SPECTRA,
        *(f"{q}_centred" for q in SPECTRA),
        *(f"{q}_frac" for q in SPECTRA),
        *(f"{q}_centred_frac" for q in SPECTRA),
        *SCALARS,
    ]
    rows = []
    for name in sorted(values["trained"]):
        layer = _layer_index(name)
        base = {"module": name, "layer": layer, "depth": (layer + 1) / n_layers}
        for state in ("trained", "untrained"):
            rows += [
                {**base, "quantity": q, "state": state, "value": values[state][name][q]}
                for q in order
                if q in values[state][name]
            ]
        for q in RATIO_QUANTITIES:
            if q not in values["trained"][name] or q not in values["untrained"][name]:
                continue
            t, u = values["trained"][name][q], values["untrained"][name][q]
            rows.append(
                {**base, "quantity": q, "state": "ratio", "value": t / u if u != 0 else math.nan}
            )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def ab_dynamics_table(
    run: TrainedRun,
    indices: np.ndarray,
    batch_size: int,
    energy_fraction: float,
    baseline: str,
    seed: int,
    init_std: float | None = None,
    cka_max_frames: int = CKA_MAX_FRAMES,
) -> pd.DataFrame:
    """The table (:func:`ab_table_from_statistics`) on the training utterances ``indices``,
    computed in memory (:func:`ab_statistics`), with the run's key columns left out."""
    tensors = ab_statistics(run, indices, batch_size, baseline, seed, init_std, cka_max_frames)
    return ab_table_from_statistics(tensors, len(run.encoder.layers), energy_fraction)


def baseline_settings(cfg) -> tuple[str, float | None]:
    """``(untrained_baseline, untrained_init_std or None)`` from settings that hold the
    std only for the ``paper`` baseline (what :func:`serlens.analysis.passes.pass_settings` passes)."""
    baseline = cfg["untrained_baseline"]
    return baseline, (float(cfg["untrained_init_std"]) if baseline == "paper" else None)


def compute_ab_dynamics(run: TrainedRun, cfg, seed: int) -> pd.DataFrame:
    """A/B activation and gradient dynamics of a LoRA run on its training sample, in memory.

    The sample is ``balanced_sample(train labels, cfg["train_sample"], seed)``; the baseline
    ``cfg["untrained_baseline"]`` (and ``cfg["untrained_init_std"]`` for ``paper``). Rows:
    see :func:`ab_table_from_statistics`. ``grad_norm_A`` = ‖∂L/∂A‖_F, ``grad_norm_B`` =
    ‖∂L/∂B‖_F, ``grad_norm_ratio_B_A`` = their ratio; ``dW_from_A_norm`` = ‖s²BBᵀG‖_F,
    ``dW_from_B_norm`` = ‖s²GAᵀA‖_F, ``dW_cos``; ``cka_a_code_vs_b_out_grad`` (linear CKA
    on at most 2000 reservoir-sampled frames). Energy ranks and the CKA use audio frames
    only; the weight gradients are the exact gradients of the loss (under ``pad30`` padded
    frames are attended to, so they contribute there).
    """
    indices = balanced_sample(run.splits["train"].labels, cfg["train_sample"], seed)
    baseline, init_std = baseline_settings(cfg)
    return ab_dynamics_table(
        run, indices, cfg["batch_size"], cfg["energy_fraction"], baseline, seed, init_std
    )


# --------------------------------------------------------------------------- the workflow's analysis


def gradient_norm_ratio(long: pd.DataFrame, run_columns: list[str]) -> pd.DataFrame:
    """``quantity = grad_norm_ratio_B_A`` = ‖∂L/∂B‖_F / ‖∂L/∂A‖_F per run and state, for
    tables that do not hold it already (tables written before it was a row of their own)."""
    if "grad_norm_ratio_B_A" in set(long["quantity"]) or not {"grad_norm_A", "grad_norm_B"} <= set(
        long["quantity"]
    ):
        return long.iloc[:0]
    keys = [*run_columns, "module", "layer", "depth", "state"]
    states = long["state"].isin(["trained", "untrained"])  # not the trained/untrained ratio rows
    norm_a = long[states & (long["quantity"] == "grad_norm_A")].set_index(keys)["value"]
    norm_b = long[states & (long["quantity"] == "grad_norm_B")].set_index(keys)["value"]
    ratio = norm_b / norm_a.replace(0, np.nan)
    return ratio.dropna().reset_index().assign(quantity="grad_norm_ratio_B_A")


def _compute(run, settings) -> pd.DataFrame:
    from safetensors import safe_open

    path = run.path("ab")
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        n_layers = int(handle.metadata()["n_layers"])
    return ab_table_from_statistics(tensors, n_layers, settings["energy_fraction"])


def _draw(tables, model, context):
    from serlens.report.figures import ab_dynamics_figure

    return ab_dynamics_figure(
        tables["ab_dynamics"],
        model,
        context["energy_fraction"],
        untrained_baseline=context["untrained_baseline"],
    )


def _spec():
    from serlens.analysis.registry import AnalysisSpec, FigureSpec, TableSpec

    return AnalysisSpec(
        name="ab_dynamics",
        compute=_compute,
        applies_to=lambda method: method.kind == "lora",
        reads=frozenset({"ab"}),
        keys=("energy_fraction",),
        table=TableSpec(
            ("module", "layer", "depth", "quantity", "state"), derive=gradient_norm_ratio
        ),
        figures=(
            FigureSpec(
                "ab_dynamics",
                _draw,
                ("ab_dynamics",),
                "A/B dynamics",
                keys=("energy_fraction", "untrained_baseline"),
            ),
        ),
        doc="energy ranks (uncentred, centred, as shares of the possible rank), gradient norms "
        "and ΔW contributions of LoRA's A and B, trained vs a scale-matched untrained baseline",
    )


SPEC = _spec()
