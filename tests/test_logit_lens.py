"""Logit and tuned lens: known answers of KL and entropy, the lens at the last layer reproducing
the model's output, the tuned lens' identity start, affine pooling, L2 penalty and early
stopping, per-speaker rows, and the workflow's analysis on stored states (both fitting paths)."""

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from test_contributions import CLASSES, make_run, tiny_weights  # noqa: F401  (session fixture)

from serlens.analysis import logit_lens as logit_lens_module
from serlens.analysis.logit_lens import (
    TunedLens,
    affine_readout,
    compute_logit_lens,
    entropy,
    fit_tuned_lens,
    kl_divergence,
    lens_metrics,
    logit_lens,
    logit_lens_table,
    pooled_normalised_states,
)
from serlens.analysis.passes import write_states
from serlens.analysis.registry import ANALYSES, RunData, Settings
from serlens.methods import parse_method
from serlens.metrics import uar, war
from serlens.models.encoder import masked_mean, run_encoder
from serlens.train.data import Split
from serlens.train.heads import EmotionHead

CFG = {"batch_size": 2, "train_sample": 4, "tuned_lens": True, "tuned_lens_steps": 20}
METRICS = {"uar", "war", "agreement", "kl", "entropy"}


# ---- pure functions --------------------------------------------------------------------


def test_kl_known_answer_and_zero_on_itself():
    p = torch.log(torch.tensor([0.5, 0.5]))
    q = torch.log(torch.tensor([0.25, 0.75]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(kl_divergence(p, q)) == pytest.approx(expected)
    assert float(kl_divergence(q, p)) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    logits = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(kl_divergence(logits, logits), torch.zeros(3, 5), atol=1e-6)
    assert (kl_divergence(logits[:, :1], logits) >= -1e-6).all()
    # logits are defined up to a constant
    assert float(kl_divergence(p + 3.0, q - 1.0)) == pytest.approx(expected)


def test_entropy_known_answers():
    assert float(entropy(torch.zeros(4))) == pytest.approx(math.log(4))
    assert float(entropy(torch.tensor([0.0, -1e4, -1e4]))) == pytest.approx(0.0, abs=1e-6)
    two = torch.log(torch.tensor([0.25, 0.75]))
    assert float(entropy(two)) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_tuned_lens_starts_at_identity_and_translating_commutes_with_pooling():
    torch.manual_seed(0)
    head = EmotionHead(6, 3, 5)
    states = torch.randn(7, 4, 6)
    lens = TunedLens(head, 3, 6)
    with torch.no_grad():
        assert torch.equal(lens(states), logit_lens(head, states))
        lens.weight.normal_()
        lens.bias.normal_()
        frames = torch.randn(2, 9, 4, 6)  # (B, T, L + 1, D)
        mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
        pooled_then_translated = lens.translate(
            torch.stack([masked_mean(frames[:, :, layer], mask) for layer in range(4)], dim=1)
        )
        translated = torch.stack([lens.translate(frames[:, t]) for t in range(9)], dim=1)
        translated_then_pooled = torch.stack(
            [masked_mean(translated[:, :, layer], mask) for layer in range(4)], dim=1
        )
        assert torch.allclose(pooled_then_translated, translated_then_pooled, atol=1e-5)
        assert torch.equal(
            lens.translate(states)[:, -1], states[:, -1]
        )  # the last layer stays as it is


def test_fit_tuned_lens_lowers_the_kl_deterministically_and_leaves_the_head():
    torch.manual_seed(0)
    head = EmotionHead(8, 3, 5)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    states = torch.randn(12, 3, 8)
    final = logit_lens(head, states[:, -1:])
    with torch.no_grad():
        start = kl_divergence(final, logit_lens(head, states)).mean(0)
    lens = fit_tuned_lens(head, states, steps=50)
    with torch.no_grad():
        end = kl_divergence(final, lens(states)).mean(0)
    assert (end[:-1] < start[:-1]).all() and end[-1] == 0
    again = fit_tuned_lens(head, states, steps=50)
    assert torch.equal(lens.weight, again.weight)
    assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())
    assert all(p.grad is None for p in head.parameters())


def test_affine_shortcut_fits_the_same_lens_as_the_direct_path(monkeypatch):
    import serlens.analysis.logit_lens as logit_lens_module

    torch.manual_seed(1)
    head = EmotionHead(8, 3, 5)
    weight, bias = affine_readout(head, 8)
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.allclose(x @ weight.T + bias, head(x), atol=1e-5)
    assert affine_readout(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh()), 8) is None
    states = torch.randn(12, 3, 8)
    shortcut = fit_tuned_lens(head, states, steps=30)
    monkeypatch.setattr(logit_lens_module, "affine_readout", lambda head, d_model: None)
    direct = fit_tuned_lens(head, states, steps=30)
    assert torch.allclose(shortcut.weight, direct.weight, atol=1e-5)
    assert torch.allclose(shortcut.bias, direct.bias, atol=1e-5)


def test_weighted_sum_head_is_refused():
    with pytest.raises(ValueError, match="weighted-sum"):
        logit_lens(EmotionHead(4, 2, 3, n_layers=3), torch.zeros(1, 3, 4))


# ---- on real runs ----------------------------------------------------------------------


def _values(table, lens, variant):
    sub = table[(table["lens"] == lens) & (table["variant"] == variant)]
    return sub.sort_values(["layer", "metric"])["value"].to_numpy()


@pytest.fixture(scope="module")
def lora_run(tiny_weights):  # noqa: F811
    return make_run(tiny_weights, rank=4, b_std=0.05)


@pytest.fixture(scope="module")
def lora_table(lora_run):
    return compute_logit_lens(lora_run, CFG, seed=0)


def test_last_layer_is_the_models_output(lora_run, lora_table):
    run, table = lora_run, lora_table
    test = run.splits["test"]
    n_layers = 4
    last = table[(table["layer"] == n_layers) & (table["variant"] == "adapted")].set_index(
        ["lens", "metric"]
    )["value"]
    for lens in ("logit", "tuned"):
        assert last[(lens, "kl")] == pytest.approx(0.0, abs=1e-6)
        assert last[(lens, "agreement")] == 1.0

    # What the model outputs: head(masked_mean(last_hidden_state)), one utterance at a time.
    with torch.inference_mode():
        outputs = []
        for _, batch in run.batches(test, 1):
            out = run_encoder(run.encoder, batch)
            outputs.append(run.head(masked_mean(out.last_hidden_state, out.frame_mask)))
        order = np.argsort(test.durations, kind="stable")
        model_logits = torch.zeros(len(test), len(CLASSES))
        model_logits[order] = torch.cat(outputs)
        lens_logits = torch.zeros_like(model_logits)
        for chunk, batch in run.batches(test, 2):
            lens_logits[chunk] = logit_lens(run.head, pooled_normalised_states(run.encoder, batch))[
                :, -1
            ]
    assert torch.allclose(lens_logits, model_logits, atol=1e-4)
    preds = model_logits.argmax(1).numpy()
    assert last[("logit", "uar")] == pytest.approx(uar(test.labels, preds, len(CLASSES)))
    assert last[("logit", "war")] == pytest.approx(war(test.labels, preds))
    ent = entropy(model_logits).mean()
    assert last[("logit", "entropy")] == pytest.approx(float(ent), abs=1e-5)


def test_table_layout_and_variants(lora_table):
    table = lora_table
    assert list(table.columns) == [
        "lens",
        "variant",
        "layer",
        "depth",
        "metric",
        "value",
        "fit_split",
    ]
    assert set(table.loc[table["lens"] == "logit", "fit_split"]) == {"none"}
    assert set(table.loc[table["lens"] == "tuned", "fit_split"]) == {"train_sample"}
    assert set(map(tuple, table[["lens", "variant"]].drop_duplicates().to_numpy())) == {
        ("logit", "adapted"),
        ("logit", "base"),
        ("paper_no_final_ln", "adapted"),
        ("paper_no_final_ln", "base"),
        ("tuned", "adapted"),
    }
    assert set(table[table["lens"] == "logit"]["metric"]) == METRICS
    assert set(table[table["lens"] == "paper_no_final_ln"]["metric"]) == METRICS
    assert set(table[table["lens"] == "tuned"]["metric"]) == METRICS | {"fit_kl"}
    assert sorted(table["layer"].unique()) == [0, 1, 2, 3, 4]
    # the paper's lens reads block outputs 1..L, not the embedding
    assert sorted(table.loc[table["lens"] == "paper_no_final_ln", "layer"].unique()) == [1, 2, 3, 4]
    assert np.allclose(table["depth"], table["layer"] / 4)
    assert np.all(np.isfinite(table["value"]))
    # the adapter changes what the head reads; the embedding (layer 0) is before any adapter
    adapted, base = _values(table, "logit", "adapted"), _values(table, "logit", "base")
    assert not np.allclose(adapted, base)
    layer0 = table[(table["lens"] == "logit") & (table["layer"] == 0)]
    assert np.allclose(
        *[g.sort_values("metric")["value"].to_numpy() for _, g in layer0.groupby("variant")]
    )


def test_lora_at_initialisation_adapted_equals_base_and_no_tuned_lens_when_off(tiny_weights):  # noqa: F811
    run = make_run(tiny_weights, rank=4)
    table = compute_logit_lens(run, {**CFG, "tuned_lens": False}, seed=0)
    assert set(table["lens"]) == {"logit", "paper_no_final_ln"}
    for lens in ("logit", "paper_no_final_ln"):
        np.testing.assert_array_equal(_values(table, lens, "adapted"), _values(table, lens, "base"))
    frozen = compute_logit_lens(make_run(tiny_weights), {**CFG, "tuned_lens": False}, seed=0)
    assert set(frozen["variant"]) == {"base"}


# ---- the tuned lens' penalty and early stopping ----------------------------------------


def _old_fit(head, pooled_states, steps, lr=1e-3):
    """The fit before the L2 penalty and early stopping: full-batch Adam on Σ_l mean_n KL."""
    n_layers, d_model = pooled_states.shape[1] - 1, pooled_states.shape[2]
    head = copy.deepcopy(head).requires_grad_(False)
    lens = TunedLens(head, n_layers, d_model)
    with torch.no_grad():
        target = logit_lens(head, pooled_states[:, -1:]).expand(-1, n_layers, -1)
    optimiser = torch.optim.Adam([lens.weight, lens.bias], lr=lr, fused=True)
    for _ in range(steps):
        optimiser.zero_grad()
        kl_divergence(target, lens(pooled_states)[:, :-1]).mean(dim=0).sum().backward()
        optimiser.step()
    return lens


def test_without_penalty_or_dev_the_fit_is_the_old_one():
    torch.manual_seed(0)
    head = EmotionHead(8, 3, 5)
    states = torch.randn(12, 3, 8)
    new = fit_tuned_lens(head, states, steps=40, l2=0.0)
    old = _old_fit(head, states, steps=40)
    assert torch.allclose(new.weight, old.weight, atol=1e-6)
    assert torch.allclose(new.bias, old.bias, atol=1e-6)
    assert new.best_step == 40 and [h["step"] for h in new.history] == [40]


def test_a_huge_penalty_keeps_the_translators_at_the_identity():
    torch.manual_seed(0)
    head = EmotionHead(8, 3, 5)
    states = torch.randn(12, 3, 8)
    free = fit_tuned_lens(head, states, steps=200, l2=0.0)
    held = fit_tuned_lens(head, states, steps=200, l2=1e8)
    assert free.weight.abs().max() > 0.05  # without the penalty the translators move
    assert held.weight.abs().max() < 1e-6 and held.bias.abs().max() < 1e-6
    with torch.no_grad():  # so the tuned lens is the logit lens
        assert torch.allclose(held(states), logit_lens(head, states), atol=1e-5)


def test_the_penalty_is_in_the_objective():
    torch.manual_seed(0)
    head = EmotionHead(8, 3, 5)
    states = torch.randn(12, 3, 8)
    norms = [
        float(fit_tuned_lens(head, states, 200, l2=l2).weight.square().sum())
        for l2 in (0.0, 1e-2, 1.0)
    ]
    assert norms[0] > norms[1] > norms[2]  # more penalty, translators nearer the identity
    lens = fit_tuned_lens(head, states, 5, l2=0.5)
    with torch.no_grad():
        final = logit_lens(head, states[:, -1:])
        kl = kl_divergence(final, lens(states)[:, :-1]).mean(0).sum()
        penalty = 0.5 * (lens.weight.square().sum() + lens.bias.square().sum())
    assert lens.history[-1]["fit_objective"] == pytest.approx(float(kl + penalty), rel=1e-5)


def _overfitting_case():
    """Final states x, inner states 0.25 x + noise; 16 training utterances in 16 dimensions
    overfit after a few steps, so the KL on 64 fresh (dev) utterances falls, then rises."""
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 4)
    with torch.no_grad():
        head.weight.copy_(2 * torch.randn(4, 16, generator=g))
        head.bias.zero_()

    def states(n):
        final = torch.randn(n, 16, generator=g)
        return torch.stack([0.25 * final + 0.2 * torch.randn(n, 16, generator=g), final], 1)

    return head, states(16), states(64)


def test_early_stopping_keeps_the_translators_of_the_best_dev_step():
    head, train, dev = _overfitting_case()
    kwargs = dict(l2=0.0, patience=3, lr=1e-3, eval_every=5)
    lens = fit_tuned_lens(head, train, 3000, dev, **kwargs)
    steps = [h["step"] for h in lens.history]
    dev_kl = [h["dev_kl"] for h in lens.history]
    best = steps.index(lens.best_step)
    # the dev KL fell (best after step 0) and then rose: stopped after `patience` evaluations
    assert 0 < lens.best_step < steps[-1] < 3000
    assert dev_kl[best] < dev_kl[0] and dev_kl[-1] > dev_kl[best]
    assert dev_kl[best] == min(dev_kl) and len(steps) - 1 - best == 3
    assert steps == list(range(0, steps[-1] + 1, 5))
    # the kept translators are those of the best step: the same as fitting that many steps
    again = fit_tuned_lens(head, train, lens.best_step, None, **kwargs)
    assert torch.equal(lens.weight, again.weight) and torch.equal(lens.bias, again.bias)
    with torch.no_grad():
        logits = lens(dev)
        kept = float(kl_divergence(logits[:, -1:], logits).mean(0).sum())
    assert kept == pytest.approx(dev_kl[best], rel=1e-5)


def test_the_fit_is_deterministic():
    head, train, dev = _overfitting_case()
    a = fit_tuned_lens(head, train, 200, dev, l2=1e-2, patience=5)
    b = fit_tuned_lens(head, train, 200, dev, l2=1e-2, patience=5)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert a.history == b.history and a.best_step == b.best_step


def test_negative_l2_is_refused():
    with pytest.raises(ValueError, match="l2"):
        fit_tuned_lens(EmotionHead(4, 2, 3), torch.zeros(2, 2, 4), 1, l2=-1.0)


# ---- per-speaker rows -------------------------------------------------------------------


def test_per_speaker_rows_average_to_the_run_value():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 3, 4, generator=g)
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0])
    speakers = np.array(["b", "a", "b", "a", "a", "b", "b", "c", "c"])
    whole = pd.DataFrame(lens_metrics(logits, logits[:, -1], labels, 4))
    split = pd.DataFrame(lens_metrics(logits, logits[:, -1], labels, 4, speakers))
    assert set(split.loc[split["speaker"].notna(), "metric"]) == {
        "war",
        "agreement",
        "kl",
        "entropy",
    }
    assert split.loc[split["metric"] == "uar", "speaker"].isna().all()
    assert (split.loc[split["metric"] == "uar", "n_utts"] == 9).all()
    per_speaker = split[split["speaker"].notna()]
    assert sorted(per_speaker["speaker"].unique()) == ["a", "b", "c"]
    assert dict(per_speaker.drop_duplicates("speaker")[["speaker", "n_utts"]].to_numpy()) == {
        "a": 3,
        "b": 4,
        "c": 2,
    }
    weighted = (
        per_speaker.assign(w=per_speaker["value"] * per_speaker["n_utts"])
        .groupby(["layer", "metric"])[["w", "n_utts"]]
        .sum()
    )
    run_value = (weighted["w"] / weighted["n_utts"]).rename("value").reset_index()
    merged = run_value.merge(whole, on=["layer", "metric"], suffixes=("", "_whole"))
    assert len(merged) == 3 * 4
    np.testing.assert_allclose(merged["value"], merged["value_whole"], rtol=1e-6, atol=1e-7)
    uars = split[split["metric"] == "uar"].merge(whole, on=["layer", "metric"])
    np.testing.assert_allclose(uars["value_x"], uars["value_y"])


# ---- the workflow's analysis on stored states -------------------------------------------

N_LAYERS, D = 2, 6
TEST_SPEAKERS = ["s1", "s1", "s2", "s2", "s2", "s1"]


def _split(prefix: str, n: int) -> Split:
    return Split(
        [f"{prefix}{i}" for i in range(n)],
        np.arange(n) % len(CLASSES),
        np.ones(n),
        [""] * n,
        None,
    )


def _stored_run(tmp_path, method: str, stored: set[str], seed: int = 0):
    """A RunData on small synthetic states files; ``stored`` names the optional arrays the
    pass wrote (``train``, ``dev``): the run's own pass for LoRA, the base pass's fold rows else."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {"train": _split("tr", 20), "dev": _split("dv", 8), "test": _split("te", 6)}
    arrays = {
        name: rng.standard_normal((len(split), N_LAYERS + 1, D)).astype(np.float32)
        for name, split in splits.items()
    }
    sample = [0, 3, 5, 9]
    arrays["train_sample"] = arrays["train"][sample]
    ids = {name: split.utt_ids for name, split in splits.items()}
    ids["train_sample"] = [splits["train"].utt_ids[i] for i in sample]
    wanted = {"test", "train_sample", *stored}
    # the base pass: every utterance under "all", each fold's rows as ids
    every = [u for name in ("train", "dev", "test") for u in ids[name]]
    base = np.concatenate([arrays[n] for n in ("train", "dev", "test")]) + 0.1
    base_ids = {"all": every} | {f"fold1/{n}": ids[n] for n in wanted}
    write_states(tmp_path / "base.safetensors", {"all": {"normalised": base}}, base_ids)
    write_states(
        tmp_path / "own.safetensors",
        {n: {"normalised": arrays[n]} for n in wanted},
        {n: ids[n] for n in wanted},
    )
    torch.manual_seed(0)
    save_file(EmotionHead(D, len(CLASSES), 5).state_dict(), str(tmp_path / "head.safetensors"))
    inputs = {
        "states": str(tmp_path / "own.safetensors"),
        "base_states": str(tmp_path / "base.safetensors"),
        "head": str(tmp_path / "head.safetensors"),
    }
    if not parse_method(method).trains_encoder:  # a frozen run's own states are the base pass
        inputs["states"] = inputs["base_states"]
    data = RunData("c", "m", parse_method(method), 0, 1, CLASSES, inputs)
    data.splits = splits  # cached properties: the fold's splits and speakers, as read
    data.speakers = dict(zip(ids["test"], TEST_SPEAKERS, strict=True))
    return data, arrays


SETTINGS = {
    "tuned_lens": True,
    "tuned_lens_steps": 30,
    "tuned_lens_l2": 1e-2,
    "tuned_lens_patience": 2,
}


def _analyse(data):
    settings = Settings("analysis logit_lens", SETTINGS)
    table = ANALYSES["logit_lens"].compute(data, settings)
    assert settings.accessed == set(ANALYSES["logit_lens"].keys)  # every declared key is read
    return table


@pytest.mark.parametrize("method", ["lora_r4", "frozen"])
def test_analysis_fits_on_train_and_stops_on_dev_where_stored(tmp_path, method):
    data, arrays = _stored_run(tmp_path, method, {"train", "dev"})
    table = _analyse(data)
    tuned = table[table["lens"] == "tuned"]
    assert set(tuned["fit_split"]) == {"train"}
    assert set(tuned["metric"]) == {"uar", "war", "agreement", "kl", "entropy", "fit_kl", "dev_kl"}
    n_utts = tuned.groupby("metric")["n_utts"].unique()
    assert list(n_utts["fit_kl"]) == [20] and list(n_utts["dev_kl"]) == [8]
    # the same as the table from those arrays, early-stopped on dev
    own = "adapted" if method != "frozen" else "base"
    shift = 0.1 if own == "base" else 0.0  # a frozen run's own states are the base pass
    states = {own: torch.from_numpy(arrays["test"] + shift)}
    if own == "adapted":
        states["base"] = torch.from_numpy(arrays["test"] + 0.1)
    direct = logit_lens_table(
        data.head(),
        states,
        own,
        data.splits["test"].labels,
        len(CLASSES),
        torch.from_numpy(arrays["train"] + shift),
        30,
        speakers=np.array(TEST_SPEAKERS, dtype=object),
        dev_states=torch.from_numpy(arrays["dev"] + shift),
        l2=1e-2,
        patience=2,
        fit_split="train",
    )
    pd.testing.assert_frame_equal(table, direct)


@pytest.mark.parametrize("method", ["lora_r4", "frozen"])
def test_analysis_falls_back_to_the_training_sample(tmp_path, method):
    data, arrays = _stored_run(tmp_path, method, set())
    table = _analyse(data)
    tuned = table[table["lens"] == "tuned"]
    assert set(tuned["fit_split"]) == {"train_sample"}
    assert "dev_kl" not in set(tuned["metric"])
    assert set(tuned.loc[tuned["metric"] == "fit_kl", "n_utts"]) == {4}
    assert set(table.loc[table["lens"] == "logit", "fit_split"]) == {"none"}


def test_analysis_layout_has_one_row_per_test_speaker(tmp_path):
    data, _ = _stored_run(tmp_path, "lora_r4", {"train", "dev"})
    table = _analyse(data)
    assert list(table.columns) == [
        "lens",
        "variant",
        "layer",
        "depth",
        "metric",
        "speaker",
        "n_utts",
        "value",
        "fit_split",
    ]
    per_speaker = table[table["speaker"].notna()]
    assert set(per_speaker["metric"]) == {"war", "agreement", "kl", "entropy"}
    assert dict(per_speaker.groupby("speaker")["n_utts"].unique().map(list)) == {
        "s1": [3],
        "s2": [3],
    }
    per_run = table[table["speaker"].isna()]
    assert set(per_run["metric"]) == {"uar", "fit_kl", "dev_kl"}
    # layers 0..L of each (lens, variant): one uar row, four metrics x two speakers
    logit = table[(table["lens"] == "logit") & (table["variant"] == "adapted")]
    assert len(logit) == (N_LAYERS + 1) * (1 + 4 * 2)


def test_stale_stored_training_rows_are_refused(tmp_path):
    data, _ = _stored_run(tmp_path, "lora_r4", {"train", "dev"})
    data.splits["train"] = _split("other", 20)
    with pytest.raises(ValueError, match="train utterances differ"):
        _analyse(data)


def test_aggregated_table_bands_the_means_over_utterances(tmp_path):
    from serlens.report.aggregate import aggregate_runs

    files, run_values = {}, []
    for fold in (1, 2):  # two runs on different states, aggregated as folds 1 and 2
        data, _ = _stored_run(tmp_path / f"f{fold}", "lora_r4", {"train", "dev"}, seed=fold)
        path = tmp_path / f"run{fold}.tsv"
        _analyse(data).to_csv(path, sep="\t", index=False)
        files[("m", "lora_r4", 0, fold)] = path
        run = pd.read_csv(path, sep="\t")
        sel = run[
            (run["lens"] == "logit")
            & (run["variant"] == "adapted")
            & (run["layer"] == 0)
            & (run["metric"] == "kl")
        ]
        run_values.append(np.average(sel["value"], weights=sel["n_utts"]))
    agg = aggregate_runs("logit_lens", files, resamples=200)
    kl = agg[agg["metric"] == "kl"]
    assert kl["band_low"].notna().all() and (kl["band_low"] >= 0).all()  # KL ≥ 0, so its band
    assert (kl["band_low"] <= kl["band_high"]).all()
    assert agg.loc[agg["metric"].isin(["uar", "fit_kl", "dev_kl"]), "band_low"].isna().all()
    row = kl[(kl["lens"] == "logit") & (kl["variant"] == "adapted") & (kl["layer"] == 0)]
    assert float(row["mean"].iloc[0]) == pytest.approx(np.mean(run_values))
    assert int(row["n_folds"].iloc[0]) == 2


def test_per_run_lens_table_without_speakers_keeps_its_old_layout():
    torch.manual_seed(0)
    head = EmotionHead(D, 4, 5)
    states = {"base": torch.randn(6, 3, D)}
    table = logit_lens_table(head, states, "base", np.arange(6) % 4, 4)
    assert "speaker" not in table and list(table.columns)[-1] == "fit_split"
    assert logit_lens_module.PER_UTTERANCE == ("war", "agreement", "kl", "entropy")
