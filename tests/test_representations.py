"""cka.tsv: frozen vs LoRA CKA on a real tiny.en encoder and a few synthetic clips; the
diagonal's permutation null and speaker band; the figure that draws them."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from serlens.analysis.cka import cka_matrix
from serlens.analysis.registry import ANALYSES, Settings
from serlens.analysis.representations import (
    CKA_COLUMNS,
    CKA_KEYS,
    CKA_KINDS,
    CKA_STATISTICS,
    CKA_VALUES,
    cka_table,
    compute_cka,
    frozen_and_lora_states,
)
from serlens.analysis.runs import TrainedRun
from serlens.config import validate_config
from serlens.train.data import Split

REPO = Path(__file__).resolve().parents[1]
CFG = {"batch_size": 4, "rbf_threshold": 0.5}


def _clips(n, seed):
    """Tones and noise of different lengths, so the batches need padding."""
    rng = np.random.default_rng(seed)
    waves, durations = [], []
    for i in range(n):
        seconds = rng.uniform(0.3, 0.6)
        t = np.arange(int(seconds * 16000)) / 16000
        wave = 0.2 * np.sin(2 * np.pi * (110 + 40 * i) * t) + 0.02 * rng.standard_normal(len(t))
        waves.append(wave.astype(np.float32))
        durations.append(seconds)
    return Split(
        [f"u{i}" for i in range(n)], np.arange(n) % 4, np.array(durations), [""] * n, waves
    )


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A rank-4 LoRA tiny.en encoder at initialisation (B = 0) with five short test clips."""
    from serlens.config import validate_config
    from serlens.models.encoder import load_encoder
    from serlens.models.resolve import resolve_weights
    from serlens.train.lora import LoraEmotionModel

    # The workflow's converted copy when there is one; otherwise convert (about 6 s).
    resources = REPO / "resources"
    if not (resources / "weights" / "tiny.en" / "config.json").is_file():
        resources = tmp_path_factory.mktemp("resources")
    weights = resolve_weights("bundled:tiny.en", resources)
    model = LoraEmotionModel(load_encoder(weights), 4, 4, validate_config({})["lora"])
    model.eval()
    splits = {"test": _clips(5, 0)}
    return TrainedRun(
        "tiny.en",
        "lora_r4",
        1,
        model.encoder,
        model.head,
        splits,
        list("abcd"),
        "crop",
        30.0,
        4,
        model.peft_encoder,
    )


def _diagonal(table, kind):
    rows = table[(table.kind == kind) & (table.layer_frozen == table.layer_lora)]
    return rows.sort_values("layer_frozen")["value"].to_numpy()


def test_cka_at_initialisation_is_one_on_the_diagonal(lora_run):
    n_states = len(lora_run.encoder.layers) + 1
    table = compute_cka(lora_run, CFG, seed=0)
    assert list(table.columns) == CKA_COLUMNS
    assert len(table) == len(CKA_KINDS) * n_states**2
    assert set(table.kind) == set(CKA_KINDS)
    assert not table.value.isna().any()
    np.testing.assert_allclose(table.depth_frozen, table.layer_frozen / (n_states - 1))
    np.testing.assert_allclose(table.depth_lora, table.layer_lora / (n_states - 1))
    for kind in CKA_KINDS:
        np.testing.assert_allclose(_diagonal(table, kind), 1.0, atol=1e-9)


def test_a_trained_adapter_moves_the_late_layers_only(lora_run):
    from serlens.models.encoder import pooled_layer_states

    modules = lora_run.lora_modules()
    saved = {name: m.lora_B["default"].weight.detach().clone() for name, m in modules.items()}
    split = lora_run.splits["test"]
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            for m in modules.values():
                m.lora_B["default"].weight.normal_(0.0, 0.5)
        frozen, lora = frozen_and_lora_states(lora_run, "test", batch_size=3)
        with torch.inference_mode():
            alone = pooled_layer_states(lora_run.encoder, lora_run.logmel([split.waves[3]], "crop"))
    finally:
        with torch.no_grad():
            for name, m in modules.items():
                m.lora_B["default"].weight.copy_(saved[name])

    assert frozen.shape == (
        len(lora_run.encoder.layers) + 1,
        len(split),
        lora_run.encoder.config.d_model,
    )
    assert frozen.dtype == np.float64 and lora.dtype == np.float64
    # Rows are in split order although batches run in duration order.
    np.testing.assert_allclose(lora[:, 3], alone[0].double().numpy(), rtol=1e-4, atol=1e-4)
    table = cka_table(frozen, lora, CFG["rbf_threshold"])
    for kind in CKA_KINDS:
        diagonal = _diagonal(table, kind)
        assert diagonal[0] == pytest.approx(1.0, abs=1e-9)  # the conv stem has no adapter
        assert diagonal[-1] < 0.999
    # Frozen a vs LoRA b is not LoRA a vs frozen b.
    linear = table[table.kind == "linear"].set_index(["layer_frozen", "layer_lora"])["value"]
    assert not np.isclose(linear[(1, 3)], linear[(3, 1)])


def test_cka_table_matches_cka_matrix():
    rng = np.random.default_rng(3)
    frozen = rng.standard_normal((3, 10, 5))
    lora = frozen + 0.3 * rng.standard_normal((3, 10, 5))
    table = cka_table(frozen, lora, threshold=0.7)
    for kind in CKA_KINDS:
        expected = cka_matrix(list(frozen), list(lora), kind, threshold=0.7)
        got = table[table.kind == kind].pivot(
            index="layer_frozen", columns="layer_lora", values="value"
        )
        np.testing.assert_allclose(got.to_numpy(), expected, rtol=1e-12)
    same = cka_table(frozen, frozen)
    np.testing.assert_allclose(same[same.layer_frozen == same.layer_lora].value, 1.0, atol=1e-12)


def test_frozen_run_is_refused(lora_run):
    frozen = TrainedRun(
        "tiny.en",
        "frozen",
        1,
        lora_run.encoder,
        lora_run.head,
        lora_run.splits,
        lora_run.classes,
        "crop",
        30.0,
    )
    with pytest.raises(ValueError, match="no adapter"):
        compute_cka(frozen, CFG, seed=0)


# --------------------------------------------------------------------------- null and band


def _states(seed=0, n_states=4, n=40, d=12, noise=(0.0, 0.3, 1.0, 3.0)):
    """frozen, lora (n_states, n, d): the LoRA layers drift further from the frozen ones with depth."""
    rng = np.random.default_rng(seed)
    frozen = rng.standard_normal((n_states, n, d))
    lora = np.stack([frozen[a] + noise[a] * rng.standard_normal((n, d)) for a in range(n_states)])
    return frozen, lora


SPEAKERS = np.repeat(["Ses01F", "Ses01M"], 20)


def test_cka_table_statistics_fill_the_diagonal_only():
    frozen, lora = _states()
    table = cka_table(frozen, lora, 0.5, permutations=50, resamples=60, speakers=SPEAKERS, seed=3)
    assert list(table.columns) == CKA_COLUMNS
    diagonal = table.layer_frozen == table.layer_lora
    assert table.loc[diagonal, CKA_STATISTICS].notna().all().all()
    assert table.loc[~diagonal, CKA_STATISTICS].isna().all().all()
    assert table.value.notna().all()
    same = table[diagonal]
    # the band holds the observed value (two speakers: the resample of one each is the fold)
    assert (same.ci_low <= same.value + 1e-12).all() and (same.value <= same.ci_high + 1e-12).all()
    assert (same.null_mean <= same.null_q95).all()
    # frozen and LoRA states that are the same or close are far above the null
    close = same[same.layer_frozen <= 2]
    assert (close.value > close.null_q95).all()
    debiased = same[same.kind == "debiased"]
    assert (debiased.null_mean.abs() < 0.05).all()
    # the same seed gives the same table; no permutations or resamples leave the columns empty
    again = cka_table(frozen, lora, 0.5, permutations=50, resamples=60, speakers=SPEAKERS, seed=3)
    pd.testing.assert_frame_equal(table, again)
    plain = cka_table(frozen, lora, 0.5)
    assert plain[CKA_STATISTICS].isna().all().all()
    np.testing.assert_allclose(plain.value, table.value, atol=1e-12)
    with pytest.raises(ValueError, match="one speaker per test utterance"):
        cka_table(frozen, lora, resamples=10)


def test_cka_table_bandwidth_option():
    frozen, lora = _states(seed=1)
    kornblith = cka_table(frozen, lora, 0.5)
    distinct = cka_table(frozen, lora, 0.5, bandwidth="distinct_pairs")
    other = kornblith.kind != "rbf"
    np.testing.assert_allclose(kornblith.value[other], distinct.value[other])
    assert not np.allclose(kornblith.value[~other], distinct.value[~other])


class _FakeStates:
    def __init__(self, pooled, utt_ids, path):
        self.pooled, self.ids, self.path = pooled, utt_ids, path

    def utt_ids(self, split):
        assert split == "test"
        return list(self.ids)

    def __getitem__(self, key):
        assert key == "test/pooled"
        return self.pooled


class _FakeRun:
    """What the analysis reads of a run: its and the base pass' states, the manifest's speakers."""

    def __init__(self, frozen, lora, speakers):
        ids = [f"u{i}" for i in range(frozen.shape[1])]
        self._states = {
            "states": _FakeStates(lora.transpose(1, 0, 2).astype(np.float32), ids, "own"),
            "base_states": _FakeStates(frozen.transpose(1, 0, 2).astype(np.float32), ids, "base"),
        }
        self.speakers = dict(zip(ids, speakers, strict=True))

    def states(self, which):
        return self._states[which]

    def path(self, name):
        return Path(f"{name}.tsv")


def test_the_analysis_reads_every_declared_setting_and_writes_the_spec_columns():
    spec = ANALYSES["cka"]
    assert spec.uses_seed
    assert set(spec.keys) == {"rbf_threshold", "rbf_bandwidth", "cka_permutations", "cka_resamples"}
    assert spec.table.keys == tuple(CKA_KEYS) and spec.table.values == tuple(CKA_VALUES)
    config = validate_config({"analysis": {"cka_permutations": 20, "cka_resamples": 20}})
    settings = Settings("analysis cka", spec.settings(config))
    frozen, lora = _states(seed=2)
    table = spec.compute(_FakeRun(frozen, lora, SPEAKERS), settings)
    assert settings.accessed == set(settings)
    assert list(table.columns) == CKA_COLUMNS
    assert table[table.layer_frozen == table.layer_lora][CKA_STATISTICS].notna().all().all()
    defaults = validate_config({})["analysis"]
    assert (defaults["cka_permutations"], defaults["cka_resamples"]) == (200, 200)
    assert defaults["rbf_bandwidth"] == "kornblith"
    with pytest.raises(ValueError, match="no speaker"):
        run = _FakeRun(frozen, lora, SPEAKERS)
        run.speakers.pop("u0")
        spec.compute(run, Settings("analysis cka", spec.settings(config)))


def _aggregated(per_run: dict) -> pd.DataFrame:
    """The aggregated table's layout (serlens.report.aggregate): melted to ``metric``, mean and
    std over folds, NaN values dropped (so the statistics exist on the diagonal only)."""
    frames = [
        table.assign(model=model, method=method, fold=fold)
        for (model, method, fold), table in per_run.items()
    ]
    runs = pd.concat(frames, ignore_index=True)
    long = runs.melt(
        id_vars=["model", "method", "fold", *CKA_KEYS],
        value_vars=CKA_VALUES,
        var_name="metric",
        value_name="v",
    ).dropna(subset=["v"])
    grouped = long.groupby(["model", "method", *CKA_KEYS, "metric"], sort=False)
    out = grouped["v"].agg(mean="mean", std=lambda v: v.std(ddof=1)).reset_index()
    out["n_folds"] = grouped["fold"].nunique().to_numpy()
    out["n_seeds"] = 1
    out["missing_runs"] = ""
    return out


def test_cka_figure_draws_the_null_line_and_the_speaker_band(tmp_path):
    """Render from synthetic per-run tables: the same-layer panels carry the observed line, a
    shaded band per rank and one dashed grey null line; the heat maps read the value rows."""
    from serlens.report.figures import cka_figure, save

    per_run = {}
    for r, method in enumerate(("lora_r4", "lora_r16")):
        for fold in (1, 2):
            frozen, lora = _states(seed=10 * r + fold, n_states=5, noise=(0, 0.2, 0.6, 1.2, 2.5))
            per_run[("tiny.en", method, fold)] = cka_table(
                frozen, lora, 0.5, permutations=40, resamples=40, speakers=SPEAKERS, seed=fold
            )
    aggregated = _aggregated(per_run)
    fig = cka_figure(aggregated, "tiny.en")
    top = [ax for ax in fig.get_axes() if "same layer" in ax.get_title()]
    assert len(top) == len(CKA_KINDS)
    for ax in top:
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert len(dashed) == 1 and dashed[0].get_color() == "0.45"
        kind = {"linear CKA": "linear", "debiased linear CKA": "debiased", "RBF CKA": "rbf"}[
            ax.get_title().split(",")[0]
        ]
        q95 = aggregated[(aggregated.kind == kind) & (aggregated.metric == "null_q95")]
        expected = q95.groupby("depth_frozen")["mean"].max().to_numpy()
        np.testing.assert_allclose(dashed[0].get_ydata(), expected)
        assert len(ax.collections) >= 2  # a band per rank (plus the error bars)
    legend = [t.get_text() for t in fig.subfigs[0].legends[0].get_texts()]
    assert any(t.startswith("permutation null") for t in legend)
    assert any("speaker-bootstrap" in t for t in legend)
    png, svg = tmp_path / "cka.png", tmp_path / "cka.svg"
    save(fig, png, svg)
    with Image.open(png) as image:
        assert image.size[0] > 1000 and np.asarray(image.convert("L")).std() > 1
    # A table of one value per row (no metric column, no statistics) still draws.
    old = aggregated[aggregated.metric == "value"].drop(columns="metric")
    fig = cka_figure(old, "tiny.en")
    top = [ax for ax in fig.get_axes() if "same layer" in ax.get_title()]
    assert all(not [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"] for ax in top)
    save(fig, tmp_path / "old.png", tmp_path / "old.svg")
