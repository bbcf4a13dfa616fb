"""Claim 3, "forward alignment, backward differentiation" of LoRA's A and B, as CKA quantities.

Per adapted module (so per layer), with the A code ``a = A x`` (``r``-dim), the B output
``b = B a`` (``d_out``-dim) and their loss gradients ``g_a = ∂L/∂a``, ``g_b = ∂L/∂b`` on the
*same* audio frames (rows paired across states; notation of
:mod:`serlens.analysis.ab_dynamics`)::

    cka_fwd_a        = CKA_u(a_T, a_U)          trained vs untrained A codes
    cka_fwd_b        = CKA_u(b_T, b_U)          trained vs untrained B outputs
    cka_fwd_a_null   = CKA_u(a_U, a_U')         two independent untrained draws (the null)
    cka_fwd_b_null   = CKA_u(b_U, b_U')
    cka_bwd_ba       = CKA_u(g_b, g_a)          within one model (trained; untrained as reference)

``CKA_u`` is debiased linear CKA (:func:`serlens.analysis.cka.debiased_linear_cka`: the
unbiased HSIC of Song et al. 2012, JMLR eq. 5, as in Kornblith et al. 2019 and Nguyen,
Raghu & Kornblith 2021)::

    CKA_u(X, Y) = HSIC_u(K, L) / sqrt(HSIC_u(K, K) HSIC_u(L, L)),   K = X Xᵀ, L = Y Yᵀ

It is about 0 for independent representations even with few frames per dimension, where
biased linear CKA is not (two independent ``n x d`` Gaussians give a biased CKA well
above 0 unless ``n ≫ d``; ``tests/test_claim3.py``). ``U'`` is a second untrained baseline drawn with an independent
seed (:func:`pair_seed`): a high ``cka_fwd_a`` means something only against
``cka_fwd_a_null``, because two random projections of the same inputs already share much of
the inputs' linear structure.

The B output needs no frames of its own: ``b bᵀ = a Bᵀ B aᵀ = (a Rᵀ)(a Rᵀ)ᵀ`` with
``B = Q R`` (thin QR, ``R`` ``r x r``), so its Gram comes from the stored codes exactly
(:func:`b_features`). Likewise ``g_a = g_b B`` is stored beside ``g_b`` only because it is
``r``-dimensional.

Frames are sampled by utterance (:class:`UtteranceFrameSample`): frames of one utterance
are correlated, so the utterances are ranked by a seeded permutation and taken in that
order, each with at most ``per_utterance`` of its audio frames (evenly spaced over them;
padding and leading-silence frames are excluded by the batch's ``frame_mask``), until at
least ``target_frames`` frames are held (fewer only when the sample has no more). The
default cap is ``ceil(target_frames / n_utterances)``, which spreads the frames over every
utterance of the sample when they are long enough. The paper's own variant (linear and RBF
CKA over 40 utterances, each flattened to ``1500 · r`` values) is not computed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from serlens.analysis.cka import _u_center

__all__ = [
    "CLAIM3_TARGET_FRAMES",
    "FORWARD_QUANTITIES",
    "UtteranceFrameSample",
    "b_features",
    "claim3_cka",
    "debiased_cka",
    "pair_seed",
    "u_cosine",
    "u_gram",
]

#: Frames of the claim-3 CKA sample (at least, when the analysis sample holds them).
CLAIM3_TARGET_FRAMES = 2000
#: The forward quantities (state trained) and their nulls (state untrained).
FORWARD_QUANTITIES = ("cka_fwd_a", "cka_fwd_b")


def pair_seed(seed: int) -> int:
    """The seed of the second untrained draw: independent of ``seed``'s stream (SeedSequence)."""
    return int(np.random.SeedSequence([int(seed), 3]).generate_state(1)[0])


def _gram(X) -> np.ndarray:
    """``Xᶜ Xᶜᵀ`` (column-centred, float64; torch's BLAS, not numpy's)."""
    X = torch.as_tensor(np.asarray(X)).to(torch.float64)
    X = X - X.mean(dim=0, keepdim=True)
    return (X @ X.T).numpy()


def u_gram(X) -> np.ndarray | None:
    """The U-centred linear Gram ``U(X Xᵀ)`` (Székely & Rizzo 2014); None below 4 rows."""
    X = np.asarray(X)
    return _u_center(_gram(X)) if X.shape[0] >= 4 else None


def u_cosine(U, V) -> float:
    """``<U, V>_F / (‖U‖_F ‖V‖_F)`` of two U-centred Grams: debiased CKA, since
    ``HSIC_u(K, L) = <U(K), U(L)>_F / (n(n-3))``; ``nan`` when undefined."""
    if U is None or V is None:
        return math.nan
    if U.shape != V.shape:
        raise ValueError(f"representations must share their rows; got {U.shape} and {V.shape}")
    den = math.sqrt(float(np.vdot(U, U))) * math.sqrt(float(np.vdot(V, V)))
    return float(np.vdot(U, V)) / den if np.isfinite(den) and den > 0 else math.nan


def debiased_cka(X, Y) -> float:
    """Debiased linear CKA of ``X`` and ``Y`` (rows paired); ``nan`` with fewer than 4 rows.

    The value of :func:`serlens.analysis.cka.debiased_linear_cka`, as the cosine of the
    U-centred Grams (each representation's Gram is centred once and reused).
    """
    X, Y = np.asarray(X), np.asarray(Y)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"representations must share their rows; got {X.shape} and {Y.shape}")
    return u_cosine(u_gram(X), u_gram(Y))


def b_features(codes: np.ndarray, B) -> np.ndarray:
    """``n x r`` features ``a Rᵀ`` (``B = Q R``) with the B output's Gram: ``(aRᵀ)(aRᵀ)ᵀ = b bᵀ``."""
    B = torch.as_tensor(B).detach().to("cpu", torch.float64)
    R = torch.linalg.qr(B, mode="reduced").R
    return (torch.as_tensor(np.asarray(codes)).to(torch.float64) @ R.T).numpy()


class UtteranceFrameSample:
    """Frames sampled by utterance, paired across every key offered (states, modules).

    ``utterances``: the ids (training indices) of the sample; a seeded permutation ranks
    them. ``per_utterance`` (default ``ceil(target_frames / n_utterances)``): the most
    audio frames kept of one utterance, evenly spaced over its audio frames. The sample is
    the shortest prefix of the ranked utterances holding ``>= target_frames`` frames (all
    of them if they hold fewer). Streamed: :meth:`offer` the blocks of a batch (every key
    of every state), then :meth:`prune`; an utterance beyond the prefix of those seen so
    far can never come back into it, so what is dropped is never needed and memory stays
    about ``target_frames + batch`` frames per key. Rows are kept on the CPU in float32.
    """

    def __init__(
        self,
        utterances: Iterable[int],
        target_frames: int = CLAIM3_TARGET_FRAMES,
        seed: int = 0,
        per_utterance: int | None = None,
    ):
        ids = np.unique(np.asarray(list(utterances), dtype=np.int64))
        if len(ids) == 0:
            raise ValueError("the utterance sample is empty")
        if target_frames < 1:
            raise ValueError(f"target_frames must be >= 1; got {target_frames}")
        self.target_frames = int(target_frames)
        self.per_utterance = int(
            math.ceil(target_frames / len(ids)) if per_utterance is None else per_utterance
        )
        if self.per_utterance < 1:
            raise ValueError(f"per_utterance must be >= 1; got {self.per_utterance}")
        order = np.random.default_rng(seed).permutation(len(ids))
        self.rank = {int(ids[j]): i for i, j in enumerate(order)}
        self.rows: dict[int, dict] = {}
        self.counts: dict[int, int] = {}

    def positions(self, mask_row) -> np.ndarray:
        """Frame positions kept of one utterance: ``per_utterance`` evenly spaced audio frames."""
        audio = np.flatnonzero(np.asarray(torch.as_tensor(mask_row).cpu()))
        if len(audio) <= self.per_utterance:
            return audio
        return audio[np.round(np.linspace(0, len(audio) - 1, self.per_utterance)).astype(int)]

    def offer(self, utterances, mask, blocks: dict) -> None:
        """``blocks[key]``: ``batch x frames x dims`` of the batch's ``utterances``; ``mask``
        its ``batch x frames`` frame mask (True = audio)."""
        mask = torch.as_tensor(mask).detach().cpu()
        ids = np.asarray(utterances).tolist()
        keep = [self.positions(mask[i]) for i in range(len(ids))]
        for u, frames in zip(ids, keep, strict=True):
            if u not in self.rank:
                raise KeyError(f"utterance {u} is not in the sample")
            if self.counts.setdefault(u, len(frames)) != len(frames):
                raise ValueError(f"utterance {u}: offered with a different frame mask")
        rows = torch.as_tensor(np.repeat(np.arange(len(ids)), [len(k) for k in keep]))
        cols = torch.as_tensor(np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64))
        sizes = [len(k) for k in keep]
        for key, block in blocks.items():
            # one gather and one copy to the CPU per key, then split by utterance
            picked = block.detach()[rows.to(block.device), cols.to(block.device)]
            parts = picked.to("cpu", torch.float32).split(sizes)
            for u, part in zip(ids, parts, strict=True):
                self.rows.setdefault(u, {})[key] = part

    def selected(self) -> list[int]:
        """The utterances of the current sample, in rank order."""
        ranked = sorted(self.counts, key=self.rank.__getitem__)
        out, total = [], 0
        for u in ranked:
            if total >= self.target_frames:
                break
            out.append(u)
            total += self.counts[u]
        return out

    def prune(self) -> None:
        """Drop the utterances beyond the current sample."""
        keep = set(self.selected())
        for u in list(self.counts):
            if u not in keep:
                del self.counts[u]
                self.rows.pop(u, None)

    @property
    def n_frames(self) -> int:
        return int(sum(self.counts[u] for u in self.selected()))

    def sample(self, key) -> np.ndarray:
        """The sampled rows of ``key`` (utterances in rank order), float64."""
        parts = [self.rows[u][key] for u in self.selected()]
        return torch.cat(parts).numpy().astype(np.float64)


def claim3_cka(
    sample: UtteranceFrameSample, name: str, B: dict[str, torch.Tensor], states: tuple = ()
) -> dict[str, dict[str, float]]:
    """The module docstring's quantities of module ``name``: ``{state: {quantity: value}}``.

    ``sample`` holds, per state, ``(state, name, "a_code")`` and, for the states with a
    backward, ``(state, name, "a_out_grad")`` and ``(state, name, "b_out_grad")``; ``B``
    maps each state (``trained``, ``untrained``, ``untrained_pair``) to its B factor.
    Trained rows: ``cka_fwd_a``, ``cka_fwd_b``, ``cka_bwd_ba``, ``cka_n_frames``,
    ``cka_n_utterances``; untrained rows: ``cka_fwd_a_null``, ``cka_fwd_b_null``,
    ``cka_bwd_ba``. ``states``: the states with a backward (default: trained, untrained).
    """
    states = tuple(states) or ("trained", "untrained")
    codes = {s: sample.sample((s, name, "a_code")) for s in B}
    ua = {s: u_gram(codes[s]) for s in B}
    ub = {s: u_gram(b_features(codes[s], B[s])) for s in B}
    values: dict[str, dict[str, float]] = {"trained": {}, "untrained": {}}
    values["trained"]["cka_fwd_a"] = u_cosine(ua["trained"], ua["untrained"])
    values["trained"]["cka_fwd_b"] = u_cosine(ub["trained"], ub["untrained"])
    if "untrained_pair" in B:
        pair = "untrained_pair"
        values["untrained"]["cka_fwd_a_null"] = u_cosine(ua["untrained"], ua[pair])
        values["untrained"]["cka_fwd_b_null"] = u_cosine(ub["untrained"], ub[pair])
    for s in states:
        values[s]["cka_bwd_ba"] = debiased_cka(
            sample.sample((s, name, "b_out_grad")), sample.sample((s, name, "a_out_grad"))
        )
    values["trained"]["cka_n_frames"] = float(sample.n_frames)
    values["trained"]["cka_n_utterances"] = float(len(sample.selected()))
    return values
