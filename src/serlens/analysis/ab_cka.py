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
utterance of the sample when they are long enough.

Speaker band
------------
Every sound quantity ``q`` also gets a 95 % interval over the *training speakers* of the
sample (``q_band_low``, ``q_band_high``; :func:`claim3_cka`), where the sample holds at least
3 of them: the speaker jackknife (Efron 1982, ch. 3; clusters left out whole, as in the
cluster bootstrap of the other bands)::

    θ_(s) = CKA_u on the frames of every speaker but s      (s = 1..G)
    SE    = sqrt((G-1)/G Σ_s (θ_(s) - θ̄)²)
    band  = θ ± t_{G-1, 0.975} · SE

A bootstrap over speakers would repeat a speaker's frames, and the debiased estimator
counts a frame paired with its own copy as two distinct frames (the self-similarity moves
off the diagonal), so its draws are biased away from the estimate; leaving speakers out
changes only which real frames are used. Each leave-one-out HSIC comes from sums over
frames, without an ``n x n`` Gram (:func:`_hsic_from_sums`): with ``k_i = ‖x_i‖²``,
``l_i = ‖y_i‖²``, ``s_x = Σ x_i``, ``s_y = Σ y_i`` and ``C = Σ x_i y_iᵀ``,
``tr(K̃L̃) = ‖C‖²_F - Σ k_i l_i``, ``1ᵀK̃1 = ‖s_x‖² - Σ k_i`` and
``1ᵀK̃L̃1 = s_xᵀ C s_y - s_x·Σ l_i x_i - s_y·Σ k_i y_i + Σ k_i l_i`` in Song et al.'s formula,
each a sum over frames, so a speaker's share is subtracted from the whole sample's. The
band is one run's (how much the value moves with which training speakers were sampled);
the aggregated table averages its limits over folds and seeds, as for the energy ranks.
With G speakers its resolution is coarse (t_{G-1} is 2.57 at G = 6): read it as a floor on
the uncertainty, not a test.

The paper's estimator
---------------------
Beside the sound quantities, :func:`paper_cka` computes claim 3 the way the paper's
published code does (github.com/harryporry77/Behind-the-Scenes, ``analysis.ipynb``; read
for this module, not copied). What that code does, cell by cell:

* *sample* (cells ``config_cell``, ``data_prep_cell``, ``exp3_compute_gradients``):
  ``fold_idx = 1``; ``train_samples = select_balanced_samples(train_data,
  num_per_class=10, seed=42)``, i.e. 10 **training** utterances per class (40 for its four
  classes; ``get_gradient_batch(learned_model, train_samples, ...)`` runs on them, not on
  test utterances), one utterance per batch (``batch_size=1``), each padded to 30 s by
  ``WhisperFeatureExtractor`` (1500 encoder frames).
* *representations* (``get_gradient_batch``): per adapted ``v_proj`` the outputs of
  ``lora_A`` (the code ``a``, ``1500 x r``) and of ``lora_B`` (``b``, ``1500 x d``) and their
  gradients (``retain_grad`` then ``loss.backward()`` of ``nn.CrossEntropyLoss()`` on that one
  utterance: ``∂CE_u/∂a``, ``∂CE_u/∂b``), every frame, padding included; float32.
* *flattening* (``layer_wise_cka_analysis``): ``act.reshape(act.shape[0], -1)``, one row of
  ``1500 · dims`` values per utterance (40 rows).
* *kernels* (``cka``, ``linear_cka_torch``, ``cka_rbf_numpy``,
  ``center_kernel_matrix_numpy``): trained vs untrained A codes with ``kernel_type='linear'``
  (``K = X Xᵀ``, centred ``H K H``, ``<HKH, HLH>_F / (‖HKH‖_F ‖HLH‖_F)``: the biased
  linear CKA of Kornblith et al. 2019, eq. 4-5, not the debiased one); trained vs untrained
  B outputs, and ∂L/∂b vs ∂L/∂a within each model, with ``kernel_type='rbf'``:
  ``sklearn.metrics.pairwise.rbf_kernel(X)`` at its default ``gamma = 1 / X.shape[1]``
  (``1 / (1500 · dims)``, each representation its own), centred the same way. Both return
  0.0 when a centred kernel has norm 0.
* *untrained baseline* (``create_random_lora_model``): a fresh model whose LoRA weights are
  ``nn.init.normal_(param, mean=0.0, std=0.02)`` (A and B) with a fresh head: the
  ``paper`` baseline of :mod:`serlens.analysis.ab_dynamics` at std 0.02. Its LoRA dropout is
  left in training mode there (peft builds the new layers in training mode; the notebook
  never calls ``.eval()`` on that model, as a check with peft 0.21 confirms), so its codes
  are ``A · dropout(x)``; here every state runs in eval mode (no dropout).
* *what it plots* (``layer_comparison_academic``): per layer the A-code CKA and the B-output
  CKA (the legend calls them "Trained" and "Untrained"), then the gradient CKA of the
  trained and of the untrained model. It has no null and no interval.

With ``X_u`` the flattened representation of utterance ``u`` and ``G_uv = <X_u, X_v>`` its
Gram (40 x 40), everything is a function of the Grams, so no flattened vector is kept
beyond what the Grams need::

    linear:  K = G
    RBF:     K_uv = exp(-γ ‖X_u - X_v‖²),  ‖X_u - X_v‖² = G_uu + G_vv - 2 G_uv,  γ = 1 / n_features
    CKA(K, L) = <HKH, HLH>_F / (‖HKH‖_F ‖HLH‖_F),  H = I - 11ᵀ/n

:class:`FlatGramSample` streams them: the Gram of flattened vectors needs the vectors of
every pair of utterances, and the utterances come in different batches, so it keeps each
utterance's rows until the end, exactly (float32) while a key holds at most
:data:`PAPER_EXACT_MAX_BYTES`, beyond that as a CountSketch of the flattened vector
(Charikar, Chen & Farach-Colton 2002: ``S_k = Σ_{p: h(p)=k} s(p) x_p`` over the positions
``p`` of the flattened vector, ``h`` into :data:`PAPER_SKETCH_BUCKETS` buckets and the sign
``s`` simple tabulation hashes, 3-independent (Pătraşcu & Thorup 2012), seeded, the same for
every utterance; ``E[<S_u, S_v>] = <X_u, X_v>``, error about ``‖X_u - X̄‖ ‖X_v - X̄‖ / √K``
on the centred Gram). ``paper_cka_sketch_buckets`` is ``K`` for a module with a sketched key, 0
when all are exact. B outputs come from the codes (``<vec(b_u), vec(b_v)> = <vec(a_u Rᵀ),
vec(a_v Rᵀ)>``, ``B = QR``), as for the sound quantities.

Padding: under ``pad30`` the vectors are exact, ``1500 · dims`` values of every frame, as
the paper's. Under ``crop`` an utterance has its own frames only (those the encoder
attends to: audio and leading silence); they are zero-padded to the longest of the sample,
which is what the code matrix of 30-s padding is, up to the padded frames' own codes, and
zeros change no inner product: only ``γ = 1 / (T_max · dims)`` depends on the padded length.

Gradient scale: the RBF kernel is not scale invariant, so gradients are the paper's per
utterance ``∂CE_u/∂·`` (the pass's loss is ``Σ_u CE_u / N``: its rows are multiplied by ``N``).
Its gradients are tiny (``γ ‖X_u - X_v‖²`` of order 1e-7 for ∂L/∂b of tiny.en under
``pad30``), so the RBF kernel is ``1 - γ D`` to first order and its CKA that of the linear
kernel; in the paper's float32 arithmetic ``exp(-1e-7)`` is 1 or the next float below it,
and the centred kernel is rounding. :func:`paper_rbf_cka_f32` repeats that arithmetic
(distances rounded to float32 as scikit-learn returns them, ``exp`` and the centring in
float32, 0.0 for a zero norm): the ``_f32`` rows are what the paper's code would print for
these representations.
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
    "PAPER_EXACT_MAX_BYTES",
    "PAPER_FOLD",
    "PAPER_INIT_STD",
    "PAPER_PER_CLASS",
    "PAPER_ROLES",
    "PAPER_SKETCH_BUCKETS",
    "FlatGramSample",
    "UtteranceFrameSample",
    "b_features",
    "claim3_cka",
    "debiased_cka",
    "jackknife_interval",
    "jackknife_se",
    "leave_one_group_out_cka",
    "kernel_cka",
    "pair_seed",
    "paper_cka",
    "paper_linear_cka",
    "paper_rbf_cka",
    "paper_rbf_cka_f32",
    "paper_utterances",
    "rbf_kernel_from_gram",
    "u_cosine",
    "u_gram",
]

#: Frames of the claim-3 CKA sample (at least, when the analysis sample holds them).
CLAIM3_TARGET_FRAMES = 2000
#: The forward quantities (state trained) and their nulls (state untrained).
FORWARD_QUANTITIES = ("cka_fwd_a", "cka_fwd_b")
#: The paper's protocol (``analysis.ipynb``; module docstring): ``fold_idx = 1``,
#: ``select_balanced_samples(..., num_per_class=10)``, ``nn.init.normal_(std=0.02)``.
PAPER_FOLD = 1
PAPER_PER_CLASS = 10
PAPER_INIT_STD = 0.02
#: Who the paper's representations come from: the trained adapters, the paper's untrained
#: baseline and a second, independent draw of it (the estimator's own null).
PAPER_ROLES = ("trained", "paper", "paper_pair")
#: A key of :class:`FlatGramSample` keeps its rows exactly up to this many bytes (float32).
PAPER_EXACT_MAX_BYTES = 8 * 2**20
#: Buckets of the CountSketch of a flattened vector beyond that (float32: 128 KiB each).
PAPER_SKETCH_BUCKETS = 2**15


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


#: Level of the speaker jackknife interval of the claim-3 quantities (``{q}_band_low/high``).
BAND_LEVEL = 0.95


def _feature_sums(X: torch.Tensor, Y: torch.Tensor) -> dict:
    """Sums over rows that determine the unbiased linear HSIC of ``X`` and ``Y`` (module
    docstring, "Speaker band"): ``n``, ``C = XᵀY``, ``sx = Σ x_i``, ``sy``, ``k = Σ ‖x_i‖²``,
    ``l = Σ ‖y_i‖²``, ``kl = Σ ‖x_i‖² ‖y_i‖²``, ``ux = Σ ‖y_i‖² x_i``, ``uy = Σ ‖x_i‖² y_i``."""
    kx, ly = (X * X).sum(dim=1), (Y * Y).sum(dim=1)
    return {
        "n": float(X.shape[0]),
        "C": X.T @ Y,
        "sx": X.sum(dim=0),
        "sy": Y.sum(dim=0),
        "k": float(kx.sum()),
        "l": float(ly.sum()),
        "kl": float((kx * ly).sum()),
        "ux": (X * ly[:, None]).sum(dim=0),
        "uy": (Y * kx[:, None]).sum(dim=0),
    }


def _hsic_from_sums(t: dict) -> float:
    """Song et al.'s unbiased HSIC (:func:`serlens.analysis.cka.hsic_unbiased`) of linear
    kernels from :func:`_feature_sums` (``K̃``, ``L̃``: the Grams with zeroed diagonal)::

        tr(K̃L̃) = ‖C‖²_F - kl        1ᵀK̃1 = ‖sx‖² - k        1ᵀL̃1 = ‖sy‖² - l
        1ᵀK̃L̃1 = sxᵀ C sy - sx·ux - sy·uy + kl

    ``nan`` below 4 rows."""
    n = t["n"]
    if n < 4:
        return math.nan
    C, sx, sy = t["C"], t["sx"], t["sy"]
    tr = float((C * C).sum()) - t["kl"]
    ok, ol = float(sx @ sx) - t["k"], float(sy @ sy) - t["l"]
    okl = float(sx @ (C @ sy)) - float(sx @ t["ux"]) - float(sy @ t["uy"]) + t["kl"]
    return (tr + ok * ol / ((n - 1) * (n - 2)) - 2.0 * okl / (n - 2)) / (n * (n - 3))


def _minus(total: dict, part: dict) -> dict:
    return {key: total[key] - part[key] for key in total}


def _prepared(X) -> torch.Tensor:
    """``X`` in float64, its column means removed and scaled to unit Frobenius norm: neither
    changes a debiased linear CKA (``HSIC_u`` is invariant to ``K → K + a1ᵀ + 1aᵀ + c``, and
    CKA to scale), and both keep the sums of :func:`_feature_sums` well conditioned."""
    X = torch.as_tensor(np.asarray(X)).to(torch.float64)
    X = X - X.mean(dim=0, keepdim=True)
    norm = torch.linalg.norm(X)
    return X / norm if norm > 0 else X


def leave_one_group_out_cka(reps: dict, pairs: dict, groups) -> dict[str, tuple[float, np.ndarray]]:
    """Debiased linear CKA of each named pair on all rows and with each group left out.

    ``reps``: name -> ``n x d`` rows (paired across names); ``pairs``: quantity ->
    ``(name, name)``; ``groups``: the group (speaker) of each row, or None (no group left
    out). Returns quantity -> ``(CKA on all rows, CKA without group g for each g in sorted
    order)``. Each HSIC comes
    from the sums of :func:`_feature_sums` (the whole sample's minus the group's), so no
    ``n x n`` Gram is formed: ``O(n d_x d_y)`` per pair for every group together. The
    values equal :func:`debiased_cka` of the same rows (``tests/test_claim3.py``).
    """
    rows = {}
    if groups is not None:
        groups = np.asarray(groups)
        rows = {
            g: torch.as_tensor(np.flatnonzero(groups == g)) for g in sorted(set(groups.tolist()))
        }
    prepared = {name: _prepared(X) for name, X in reps.items()}
    cache: dict[tuple[str, str], tuple[float, np.ndarray]] = {}

    def hsic(x: str, y: str) -> tuple[float, np.ndarray]:
        if (x, y) not in cache:
            X, Y = prepared[x], prepared[y]
            total = _feature_sums(X, Y)
            held = [
                _hsic_from_sums(_minus(total, _feature_sums(X[r], Y[r]))) for r in rows.values()
            ]
            cache[(x, y)] = (_hsic_from_sums(total), np.array(held))
        return cache[(x, y)]

    def cosine(xy, xx, yy):
        with np.errstate(invalid="ignore", divide="ignore"):
            den = np.sqrt(np.asarray(xx) * np.asarray(yy))
            return np.where(den > 0, np.asarray(xy) / np.where(den > 0, den, 1.0), np.nan)

    out = {}
    for quantity, (x, y) in pairs.items():
        (v_xy, l_xy), (v_xx, l_xx), (v_yy, l_yy) = hsic(x, y), hsic(x, x), hsic(y, y)
        out[quantity] = (float(cosine(v_xy, v_xx, v_yy)), cosine(l_xy, l_xx, l_yy))
    return out


def jackknife_interval(estimate: float, leave_one_out, level: float = BAND_LEVEL):
    """``estimate ± t_{G-1, (1+level)/2} · SE_jack`` over ``G`` leave-one-group-out values
    (:func:`jackknife_se`); ``(nan, nan)`` with fewer than 3 groups."""
    from scipy.special import stdtrit

    se = jackknife_se(leave_one_out)
    if not math.isfinite(se) or not math.isfinite(estimate):
        return math.nan, math.nan
    half = float(stdtrit(len(leave_one_out) - 1, 0.5 + level / 2)) * se
    return estimate - half, estimate + half


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
    sample: UtteranceFrameSample,
    name: str,
    B: dict[str, torch.Tensor],
    states: tuple = (),
    speakers: dict | None = None,
) -> dict[str, dict[str, float]]:
    """The module docstring's quantities of module ``name``: ``{state: {quantity: value}}``.

    ``sample`` holds, per state, ``(state, name, "a_code")`` and, for the states with a
    backward, ``(state, name, "a_out_grad")`` and ``(state, name, "b_out_grad")``; ``B``
    maps each state (``trained``, ``untrained``, ``untrained_pair``) to its B factor.
    Trained rows: ``cka_fwd_a``, ``cka_fwd_b``, ``cka_bwd_ba``, ``cka_n_frames``,
    ``cka_n_utterances``; untrained rows: ``cka_fwd_a_null``, ``cka_fwd_b_null``,
    ``cka_bwd_ba``. ``states``: the states with a backward (default: trained, untrained).

    ``speakers``: utterance id -> speaker. With at least 3 speakers among the sampled
    utterances, every quantity ``q`` also gets ``q_band_low``/``q_band_high``, the 95 %
    speaker-jackknife interval (:func:`leave_one_group_out_cka`, :func:`jackknife_interval`;
    module docstring, "Speaker band"), and the trained rows ``cka_n_speakers``.
    """
    states = tuple(states) or ("trained", "untrained")
    reps = {}
    for s in B:
        codes = sample.sample((s, name, "a_code"))
        reps[f"a_{s}"], reps[f"b_{s}"] = codes, b_features(codes, B[s])
    for s in states:
        reps[f"ga_{s}"] = sample.sample((s, name, "a_out_grad"))
        reps[f"gb_{s}"] = sample.sample((s, name, "b_out_grad"))
    pairs = {
        ("trained", "cka_fwd_a"): ("a_trained", "a_untrained"),
        ("trained", "cka_fwd_b"): ("b_trained", "b_untrained"),
    }
    if "untrained_pair" in B:
        pairs[("untrained", "cka_fwd_a_null")] = ("a_untrained", "a_untrained_pair")
        pairs[("untrained", "cka_fwd_b_null")] = ("b_untrained", "b_untrained_pair")
    for s in states:
        pairs[(s, "cka_bwd_ba")] = (f"gb_{s}", f"ga_{s}")
    selected = sample.selected()
    who = [None if speakers is None else speakers.get(u) for u in selected]
    groups = np.repeat(
        np.array(["" if w is None else str(w) for w in who], dtype=object),
        [sample.counts[u] for u in selected],
    )
    n_speakers = len({w for w in who if w is not None}) if None not in who else 0
    computed = leave_one_group_out_cka(reps, pairs, groups if n_speakers >= 3 else None)
    values: dict[str, dict[str, float]] = {"trained": {}, "untrained": {}}
    for (state, quantity), (estimate, held_out) in computed.items():
        values[state][quantity] = estimate
        if n_speakers >= 3:
            low, high = jackknife_interval(estimate, held_out)
            values[state][f"{quantity}_band_low"], values[state][f"{quantity}_band_high"] = (
                low,
                high,
            )
    values["trained"]["cka_n_frames"] = float(sample.n_frames)
    values["trained"]["cka_n_utterances"] = float(len(selected))
    if n_speakers >= 3:
        values["trained"]["cka_n_speakers"] = float(n_speakers)
    return values


# --------------------------------------------------------------------------- the paper's estimator


def paper_utterances(indices, labels, seed: int, per_class: int = PAPER_PER_CLASS) -> np.ndarray:
    """The paper's sample out of the analysis sample ``indices``: per class (in sorted label
    order) the first ``per_class`` of a seeded permutation of its utterances in ``indices``
    (all of them if it has fewer), ascending. ``labels``: of the whole training split.

    The paper takes 10 per class from the shuffled training split (``select_balanced_samples``);
    the analysis sample is itself a seeded class-balanced sample of it, so this is too, and
    the trained state's pass already holds its utterances.
    """
    indices = np.unique(np.asarray(indices, dtype=np.int64))
    own = np.asarray(labels)[indices]
    rng = np.random.default_rng([int(seed), 5])
    picks = [rng.permutation(indices[own == c])[:per_class] for c in np.unique(own)]
    return np.sort(np.concatenate(picks)) if picks else indices[:0]


def _centre(K: np.ndarray) -> np.ndarray:
    """``H K H`` over the last two axes (row, column and grand means removed)."""
    return (
        K
        - K.mean(axis=-1, keepdims=True)
        - K.mean(axis=-2, keepdims=True)
        + K.mean(axis=(-2, -1), keepdims=True)
    )


def kernel_cka(K, L) -> np.ndarray | float:
    """``<HKH, HLH>_F / (‖HKH‖_F ‖HLH‖_F)`` (biased HSIC; Kornblith et al. 2019, eq. 4-5).

    ``K``, ``L``: ``n x n`` kernels or stacks ``(..., n, n)``; NaN where a centred kernel
    is 0 (the paper's code returns 0.0 there).
    """
    Kc, Lc = _centre(np.asarray(K, np.float64)), _centre(np.asarray(L, np.float64))
    num = (Kc * Lc).sum(axis=(-2, -1))
    den = np.sqrt((Kc * Kc).sum(axis=(-2, -1)) * (Lc * Lc).sum(axis=(-2, -1)))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return float(out) if out.ndim == 0 else out


def _squared_distances(G: np.ndarray) -> np.ndarray:
    """``‖X_u - X_v‖² = G_uu + G_vv - 2 G_uv``, clipped at 0, zero diagonal (as
    ``euclidean_distances(X, X, squared=True)``)."""
    G = np.asarray(G, np.float64)
    d = np.diag(G)
    D = np.maximum(d[:, None] + d[None, :] - 2.0 * G, 0.0)
    np.fill_diagonal(D, 0.0)
    return D


def rbf_kernel_from_gram(G, n_features: int, gamma: float | None = None) -> np.ndarray:
    """``exp(-γ ‖X_u - X_v‖²)`` from the Gram ``G = X Xᵀ``; ``γ`` defaults to
    ``1 / n_features``, ``sklearn.metrics.pairwise.rbf_kernel``'s default."""
    gamma = 1.0 / n_features if gamma is None else gamma
    return np.exp(-gamma * _squared_distances(G))


def paper_linear_cka(G_x, G_y) -> float:
    """The paper's ``linear_cka_torch`` of two flattened representations, from their Grams."""
    return kernel_cka(G_x, G_y)


def paper_rbf_cka(G_x, n_x: int, G_y, n_y: int) -> float:
    """The paper's ``cka_rbf_numpy`` (RBF at ``γ = 1 / n_features`` each) from the Grams."""
    return kernel_cka(rbf_kernel_from_gram(G_x, n_x), rbf_kernel_from_gram(G_y, n_y))


def _rbf_f32(G, n_features: int) -> np.ndarray:
    # scikit-learn on float32 rows: distances in float64 chunks, returned as float32; then
    # ``K *= -gamma`` and ``np.exp(K, K)`` in float32
    K = _squared_distances(G).astype(np.float32)
    K *= np.float32(-1.0 / n_features)
    return np.exp(K, out=K)


def paper_rbf_cka_f32(G_x, n_x: int, G_y, n_y: int) -> float:
    """:func:`paper_rbf_cka` in the paper's float32 arithmetic (module docstring): the kernels,
    their centring (row, column and grand means) and the sums in float32; 0.0 when a centred
    kernel has norm 0, as ``cka_rbf_numpy`` returns."""
    K, L = _rbf_f32(G_x, n_x), _rbf_f32(G_y, n_y)

    def centre(M):
        return M - M.mean(axis=1, keepdims=True) - M.mean(axis=0, keepdims=True) + M.mean()

    Kc, Lc = centre(K), centre(L)
    norm_x, norm_y = np.sqrt(np.sum(Kc * Kc)), np.sqrt(np.sum(Lc * Lc))
    if norm_x == 0 or norm_y == 0:
        return 0.0
    return float(np.sum(Kc * Lc) / (norm_x * norm_y))


class FlatGramSample:
    """Grams of utterances' flattened ``frames x dims`` matrices, streamed (module docstring).

    ``utterances``: the sample's ids; every Gram's rows are in ascending id order. Each
    :meth:`offer` passes the blocks of a batch (``batch x frames x dims``, under any keys)
    with the frames to keep of each row (``lengths``: a prefix; zero beyond it, up to the
    longest of the sample); rows of other utterances are ignored. A key keeps its rows on
    the CPU in float32 while they hold at most ``exact_max_bytes``; past that, it keeps the
    CountSketch (``buckets``, hashes seeded by ``seed``) of each flattened vector instead.
    ``derived[key] = (source, M)``: ``key``'s rows are ``source``'s rows times ``M`` (``dims
    x dims'``), computed from the source's exact rows when its Gram is asked for, or
    sketched beside the source once the source is sketched.
    """

    def __init__(
        self,
        utterances: Iterable[int],
        derived: dict | None = None,
        exact_max_bytes: int = PAPER_EXACT_MAX_BYTES,
        buckets: int = PAPER_SKETCH_BUCKETS,
        seed: int = 0,
    ):
        self.ids = np.unique(np.asarray(list(utterances), dtype=np.int64))
        if len(self.ids) == 0:
            raise ValueError("the utterance sample is empty")
        self.members = set(self.ids.tolist())
        self.exact_max_bytes = int(exact_max_bytes)
        self.buckets = int(buckets)
        self.derived = {}
        self.by_source: dict = {}
        for key, (source, M) in (derived or {}).items():
            M = torch.as_tensor(M).detach().to("cpu", torch.float64)
            self.derived[key] = (source, M)
            self.by_source.setdefault(source, []).append(key)
        if self.buckets < 1 or self.buckets & (self.buckets - 1):
            raise ValueError(f"buckets must be a power of 2; got {self.buckets}")
        # simple tabulation: one random 62-bit word per byte value and byte of the position,
        # for the bucket and for the sign (positions < 2^32)
        rng = np.random.default_rng([int(seed), 7])
        self.tables = torch.from_numpy(rng.integers(0, 2**62, (2, 4, 256), dtype=np.int64))
        self._on_device: dict = {}
        self.lengths: dict[int, int] = {}
        self.dims: dict = {}
        self.rows: dict = {}  # key -> {utterance: (frames, dims) float32, CPU}
        self.sketches: dict = {}  # key -> {utterance: (buckets,) float32, CPU}
        self.nbytes: dict = {}

    # ------------------------------------------------------------------ streaming

    def offer(self, utterances, lengths, blocks: dict) -> None:
        ids = np.asarray(utterances).tolist()
        lengths = [int(n) for n in np.asarray(torch.as_tensor(lengths).cpu())]
        chosen = [i for i, u in enumerate(ids) if u in self.members]
        for i in chosen:
            if self.lengths.setdefault(ids[i], lengths[i]) != lengths[i]:
                raise ValueError(f"utterance {ids[i]}: offered with a different frame count")
        if not chosen:
            return
        for key, block in blocks.items():
            block = block.detach()
            if self.dims.setdefault(key, block.shape[-1]) != block.shape[-1]:
                raise ValueError(
                    f"{key}: offered with {block.shape[-1]} dims, had {self.dims[key]}"
                )
            for i in chosen:
                self._store(key, ids[i], block[i, : lengths[i]])

    def _store(self, key, u: int, rows: torch.Tensor) -> None:
        if key in self.sketches:
            self.sketches[key][u] = self._sketch(rows)
            for derived in self.by_source.get(key, ()):
                M = self.derived[derived][1]
                self.sketches[derived][u] = self._sketch(rows.to(torch.float64) @ M.to(rows.device))
            return
        kept = rows.to("cpu", torch.float32).clone()
        self.rows.setdefault(key, {})[u] = kept
        self.nbytes[key] = self.nbytes.get(key, 0) + kept.numel() * 4
        if self.nbytes[key] > self.exact_max_bytes:
            self._to_sketch(key)

    def _to_sketch(self, key) -> None:
        rows = self.rows.pop(key)
        self.nbytes.pop(key)
        self.sketches[key] = {}
        for derived in self.by_source.get(key, ()):
            self.sketches[derived] = {}
        for u, part in rows.items():
            self._store(key, u, part)

    def _sketch(self, rows: torch.Tensor) -> torch.Tensor:
        """CountSketch of ``rows`` flattened frame by frame (position ``p = t · dims + c``)."""
        flat = rows.reshape(-1).to(torch.float64)
        bucket, sign = self._hashes(flat.numel(), flat.device)
        out = torch.zeros(self.buckets, dtype=torch.float64, device=flat.device)
        out.index_add_(0, bucket, flat * sign)
        return out.to("cpu", torch.float32)

    def _hashes(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket and sign of positions ``0 .. n-1``: a prefix of the longest computed so far
        on ``device`` (a position's hashes do not depend on the vector's length)."""
        if n >= 2**32:
            raise ValueError(f"{n} values: the sketch hashes positions below 2^32")
        cached = self._on_device.get(device)
        if cached is None or cached[0].numel() < n:
            p = torch.arange(n, device=device, dtype=torch.int64)
            tables = self.tables.to(device)
            words = [(p >> (8 * i)) & 255 for i in range(4)]
            h = [t[0][words[0]] ^ t[1][words[1]] ^ t[2][words[2]] ^ t[3][words[3]] for t in tables]
            cached = (h[0] & (self.buckets - 1), (h[1] & 1).to(torch.float64) * 2.0 - 1.0)
            self._on_device[device] = cached
        return cached[0][:n], cached[1][:n]

    # ------------------------------------------------------------------ results

    def selected(self) -> list[int]:
        """The utterances offered so far, ascending (the rows of every Gram)."""
        return sorted(self.lengths)

    @property
    def n_frames(self) -> int:
        """Frames of each flattened vector: the longest utterance's (zero padding beyond)."""
        return max(self.lengths.values()) if self.lengths else 0

    def sketched(self, key) -> bool:
        return key in self.sketches or (
            key in self.derived and self.derived[key][0] in self.sketches
        )

    def gram(self, key) -> np.ndarray:
        """``G_uv = <vec(X_u), vec(X_v)>`` over :meth:`selected` (float64)."""
        order = self.selected()
        if key in self.derived and self.derived[key][0] not in self.sketches:
            source, M = self.derived[key]
            return self._exact_gram(source, order, M)
        if key in self.sketches:
            S = torch.stack([self.sketches[key][u] for u in order]).to(torch.float64)
            return (S @ S.T).numpy()
        return self._exact_gram(key, order)

    def _exact_gram(self, key, order, M: torch.Tensor | None = None) -> np.ndarray:
        rows = self.rows[key]
        missing = [u for u in order if u not in rows]
        if missing:
            raise KeyError(f"{key}: utterances {missing[:3]} were not offered")
        dims = self.dims[key] if M is None else M.shape[1]
        X = torch.zeros((len(order), self.n_frames, dims), dtype=torch.float64)
        for i, u in enumerate(order):
            part = rows[u].to(torch.float64)
            X[i, : part.shape[0]] = part if M is None else part @ M
        X = X.reshape(len(order), -1)
        return (X @ X.T).numpy()


def _subsample_cka(
    kernels: dict, pairs: dict, subsets: np.ndarray, chunk: int = 100
) -> dict[str, np.ndarray]:
    """Per subset (rows of ``subsets``: utterance indices) the CKA of each named pair of
    kernels (``pairs[name] = (kernel name, kernel name)``) restricted to it; ``chunk``
    subsets at a time, so memory is ``chunk · n²`` per kernel."""
    out: dict[str, list] = {name: [] for name in pairs}
    for start in range(0, len(subsets), chunk):
        d = subsets[start : start + chunk]
        cut = {k: K[d[:, :, None], d[:, None, :]] for k, K in kernels.items()}
        for name, (x, y) in pairs.items():
            out[name].append(np.atleast_1d(kernel_cka(cut[x], cut[y])))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def jackknife_se(leave_one_out) -> float:
    """``SE_jack = sqrt((n-1)/n Σ_i (θ_(i) - θ̄)²)`` over the ``n`` leave-one-out values
    (Efron & Stein 1981; Efron 1982, ch. 3); NaN with fewer than 3 or a NaN among them."""
    values = np.asarray(leave_one_out, dtype=float)
    n = len(values)
    if n < 3 or not np.isfinite(values).all():
        return math.nan
    return math.sqrt((n - 1) / n * float(np.sum((values - values.mean()) ** 2)))


def paper_cka(
    sample: FlatGramSample,
    name: str,
    dims: dict[str, int],
    speakers: dict | None = None,
) -> dict[str, dict[str, float]]:
    """The paper's estimator of module ``name`` (module docstring): ``{state: {quantity: value}}``.

    ``sample`` holds, for each role of :data:`PAPER_ROLES`, ``(role, name, "a_code")`` and
    the derived ``(role, name, "b_feat")`` (the B output's features), and, for ``trained``
    and ``paper``, ``(role, name, "a_out_grad")`` and ``(role, name, "b_out_grad")`` (per
    utterance ``∂CE_u/∂a``, ``∂CE_u/∂b``). ``dims``: ``r`` (``"a"``) and ``d_out`` (``"b"``).
    With ``T`` = ``sample.n_frames``, ``lin`` = :func:`paper_linear_cka` and ``rbf`` =
    :func:`paper_rbf_cka` (``γ = 1 / (T · dims)``)::

        trained:   paper_cka_fwd_a   = lin(a_trained, a_paper)
                   paper_cka_fwd_b   = rbf(b_trained, b_paper)
                   paper_cka_bwd_ba  = rbf(∂L/∂b, ∂L/∂a) of the trained model
        untrained: paper_cka_fwd_a_null = lin(a_paper, a_paper'),  paper_cka_fwd_b_null = rbf(b_paper, b_paper')
                   paper_cka_bwd_ba  = rbf(∂L/∂b, ∂L/∂a) of the paper's untrained model

    ``_f32``: the RBF ones in the paper's float32 arithmetic (:func:`paper_rbf_cka_f32`);
    ``paper_cka_bwd_exponent``: the median over pairs of ``γ ‖X_u - X_v‖²`` of ∂L/∂b (below
    about 6e-8 the float32 kernel is all ones). Per module, the claim's statistics
    ``excess = ½[(fwd_a - fwd_a_null) + (fwd_b - fwd_b_null)]`` and
    ``fwd_minus_bwd = ½(fwd_a + fwd_b) - bwd_ba`` get a jackknife standard error over the
    utterances (:func:`jackknife_se`; every kernel with the same utterance left out):
    ``paper_cka_excess_se``, ``paper_cka_fwd_minus_bwd_se`` (the claims table makes the
    interval). (A bootstrap over the utterances is biased here: a resample repeats
    utterances, which puts their self-similarity off the diagonal of every kernel and moves
    the CKA, so a percentile interval can miss its own estimate.) Also
    ``paper_cka_n_utterances``, ``paper_cka_n_frames`` (``T``) and
    ``paper_cka_sketch_buckets`` (0: every Gram exact).

    ``speakers`` (utterance id -> speaker): with at least 3 speakers among the utterances,
    the same jackknife with each *speaker's* utterances left out in turn (utterances of one
    speaker are not independent): ``paper_cka_excess_speaker_se``,
    ``paper_cka_fwd_minus_bwd_speaker_se``, ``paper_cka_n_speakers``, and for every CKA
    value ``q`` its 95 % interval ``q_band_low``/``q_band_high`` (:func:`jackknife_interval`).
    """
    T = sample.n_frames
    n_a, n_b = T * int(dims["a"]), T * int(dims["b"])
    key = {q: {role: (role, name, q) for role in PAPER_ROLES} for q in ("a_code", "b_feat")}
    grams = {f"a_{role}": sample.gram(key["a_code"][role]) for role in PAPER_ROLES}
    grams |= {f"b_{role}": sample.gram(key["b_feat"][role]) for role in PAPER_ROLES}
    for role in ("trained", "paper"):
        grams[f"ga_{role}"] = sample.gram((role, name, "a_out_grad"))
        grams[f"gb_{role}"] = sample.gram((role, name, "b_out_grad"))
    # γ = 1 / n_features: the A code and ∂L/∂a have r values per frame, B's output and ∂L/∂b d_out
    features = {k: n_a if k.split("_")[0] in ("a", "ga") else n_b for k in grams}
    kernels = {
        k: (G if k.startswith("a_") else rbf_kernel_from_gram(G, features[k]))
        for k, G in grams.items()
    }
    pairs = {
        "fwd_a": ("a_trained", "a_paper"),
        "fwd_b": ("b_trained", "b_paper"),
        "fwd_a_null": ("a_paper", "a_paper_pair"),
        "fwd_b_null": ("b_paper", "b_paper_pair"),
        "bwd": ("gb_trained", "ga_trained"),
        "bwd_untrained": ("gb_paper", "ga_paper"),
    }
    v = {k: kernel_cka(kernels[x], kernels[y]) for k, (x, y) in pairs.items()}

    def f32(x, y):
        return paper_rbf_cka_f32(grams[x], features[x], grams[y], features[y])

    def exponent(k):
        D = _squared_distances(grams[k])
        return (
            float(np.median(D[np.triu_indices(len(D), 1)]) / features[k])
            if len(D) > 1
            else math.nan
        )

    trained = {
        "paper_cka_fwd_a": v["fwd_a"],
        "paper_cka_fwd_b": v["fwd_b"],
        "paper_cka_bwd_ba": v["bwd"],
        "paper_cka_fwd_b_f32": f32("b_trained", "b_paper"),
        "paper_cka_bwd_ba_f32": f32("gb_trained", "ga_trained"),
        "paper_cka_bwd_exponent": exponent("gb_trained"),
    }
    untrained = {
        "paper_cka_fwd_a_null": v["fwd_a_null"],
        "paper_cka_fwd_b_null": v["fwd_b_null"],
        "paper_cka_bwd_ba": v["bwd_untrained"],
        "paper_cka_fwd_b_null_f32": f32("b_paper", "b_paper_pair"),
        "paper_cka_bwd_ba_f32": f32("gb_paper", "ga_paper"),
        "paper_cka_bwd_exponent": exponent("gb_paper"),
    }
    n = len(sample.selected())

    def statistics(c):
        return {
            "excess": ((c["fwd_a"] - c["fwd_a_null"]) + (c["fwd_b"] - c["fwd_b_null"])) / 2,
            "fwd_minus_bwd": (c["fwd_a"] + c["fwd_b"]) / 2 - c["bwd"],
        }

    se = {"excess": math.nan, "fwd_minus_bwd": math.nan}
    if n >= 4:
        subsets = np.array([np.delete(np.arange(n), i) for i in range(n)])
        loo = statistics(_subsample_cka(kernels, pairs, subsets))
        se = {stat: jackknife_se(values) for stat, values in loo.items()}
    for stat, value in se.items():
        trained[f"paper_cka_{stat}_se"] = value
    sketched = any(sample.sketched(k) for q in key.values() for k in q.values()) or any(
        sample.sketched((role, name, g))
        for role in ("trained", "paper")
        for g in ("a_out_grad", "b_out_grad")
    )
    order = sample.selected()
    who = [None if speakers is None else speakers.get(u) for u in order]
    groups = sorted({w for w in who if w is not None}) if None not in who else []
    if len(groups) >= 3:
        # each speaker's utterances left out: one subset each (they differ in size)
        per_speaker = [
            _subsample_cka(kernels, pairs, np.array([[i for i, w in enumerate(who) if w != g]]))
            for g in groups
        ]
        held = {k: np.concatenate([d[k] for d in per_speaker]) for k in pairs}
        loo = statistics(held)
        for stat, values in loo.items():
            trained[f"paper_cka_{stat}_speaker_se"] = jackknife_se(values)
        named = {
            "fwd_a": (trained, "paper_cka_fwd_a"),
            "fwd_b": (trained, "paper_cka_fwd_b"),
            "bwd": (trained, "paper_cka_bwd_ba"),
            "fwd_a_null": (untrained, "paper_cka_fwd_a_null"),
            "fwd_b_null": (untrained, "paper_cka_fwd_b_null"),
            "bwd_untrained": (untrained, "paper_cka_bwd_ba"),
        }
        for k, (values, q) in named.items():
            values[f"{q}_band_low"], values[f"{q}_band_high"] = jackknife_interval(
                float(v[k]), held[k]
            )
        trained["paper_cka_n_speakers"] = float(len(groups))
    trained["paper_cka_n_utterances"] = float(n)
    trained["paper_cka_n_frames"] = float(T)
    trained["paper_cka_sketch_buckets"] = float(sample.buckets if sketched else 0)
    return {"trained": trained, "untrained": untrained}
