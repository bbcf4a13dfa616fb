"""The paper's logit lens (``lens = paper_no_final_ln``): the run's head on the pooled residual
stream without the encoder's final LayerNorm, beside the honest lens.

Known answers: a hand-computed two-dimensional case (the LayerNorm changes the decision), a
tiny random Whisper encoder on which the honest last layer is the model's output and the
paper's is not, the same encoder with its final LayerNorm replaced by the identity (the two
lenses are then one), and the workflow's analysis on the states its passes write (rows of both
lenses for both variants; an older pass without ``resid_last`` still loads and gives the
honest rows only)."""

import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from test_contributions import CLASSES, make_split

from serlens.analysis.logit_lens import (
    PAPER_LENS,
    compute_logit_lens,
    logit_lens,
    logit_lens_table,
    pooled_lens_states,
)
from serlens.analysis.passes import (
    STATES_FORMAT,
    States,
    adapted_pass,
    base_pass,
    every_utterance,
    pass_settings,
    raw_residual_states,
    write_states,
)
from serlens.analysis.registry import ANALYSES, RunData, Settings
from serlens.analysis.runs import TrainedRun
from serlens.methods import parse_method
from serlens.models.encoder import masked_mean, run_encoder
from serlens.train.heads import EmotionHead

D_MODEL, N_LAYERS = 16, 3
PASS = {"batch_size": 2, "train_sample": 4, "seed": 0}
CFG = {"batch_size": 2, "train_sample": 4, "tuned_lens": False, "tuned_lens_steps": 0}
SETTINGS = {
    "tuned_lens": False,
    "tuned_lens_steps": 0,
    "tuned_lens_l2": 1e-2,
    "tuned_lens_patience": 2,
}


def _metric(table, lens, variant, layer, metric):
    """The run's value: its one row, or the n_utts-weighted mean of its per-speaker rows."""
    sel = table[
        (table["lens"] == lens)
        & (table["variant"] == variant)
        & (table["layer"] == layer)
        & (table["metric"] == metric)
    ]
    assert len(sel) >= 1, (lens, variant, layer, metric)
    if "speaker" in sel and sel["speaker"].notna().any():
        return float(np.average(sel["value"], weights=sel["n_utts"]))
    assert len(sel) == 1, (lens, variant, layer, metric, len(sel))
    return float(sel["value"].iloc[0])


# ---- a hand-computed case ----------------------------------------------------------------


def _hand_ln(x, eps=1e-5):
    """LayerNorm (weight 1, bias 0) of a list, written out."""
    mean = sum(x) / len(x)
    var = sum((v - mean) ** 2 for v in x) / len(x)
    return [(v - mean) / math.sqrt(var + eps) for v in x]


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _kl(p_logits, q_logits):
    p, q = _softmax(p_logits), _softmax(q_logits)
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def test_hand_computed_paper_reading_against_the_honest_one():
    """D = 2, one frame per utterance, an identity head plus a bias: LN([4, 0]) = [1, −1] (up to
    eps), so the honest last-layer logits are [1, −1] + b and the paper's [4, 0] + b."""
    head = EmotionHead(2, 2, 2)
    bias = [0.0, 3.0]
    with torch.no_grad():
        head.projector.weight.copy_(torch.eye(2))
        head.projector.bias.zero_()
        head.classifier.weight.copy_(torch.eye(2))
        head.classifier.bias.copy_(torch.tensor(bias))
    resid = [  # per utterance: resid[0], resid[1] (L = 1)
        [[1.0, 2.0], [4.0, 0.0]],
        [[2.0, -1.0], [0.0, 4.0]],
    ]
    normalised = torch.tensor([[_hand_ln(r) for r in u] for u in resid])
    residual = torch.tensor(resid)
    labels = np.array([0, 1])
    table = logit_lens_table(
        head, {"base": normalised}, "base", labels, 2, residual_states={"base": residual}
    )

    honest = [[a + b for a, b in zip(_hand_ln(u[1]), bias, strict=True)] for u in resid]
    paper = [[a + b for a, b in zip(u[1], bias, strict=True)] for u in resid]
    # utterance 0: honest [1, 2] -> class 1, paper [4, 3] -> class 0; utterance 1: both class 1
    assert [int(np.argmax(h)) for h in honest] == [1, 1]
    assert [int(np.argmax(p)) for p in paper] == [0, 1]
    expected_kl = (_kl(honest[0], paper[0]) + _kl(honest[1], paper[1])) / 2
    assert expected_kl > 0.2  # mostly utterance 0, whose decision the LayerNorm flips
    assert _metric(table, PAPER_LENS, "base", 1, "kl") == pytest.approx(expected_kl, rel=1e-5)
    assert _metric(table, PAPER_LENS, "base", 1, "agreement") == 0.5
    assert _metric(table, PAPER_LENS, "base", 1, "war") == 1.0  # labels 0, 1
    assert _metric(table, PAPER_LENS, "base", 1, "uar") == 1.0
    # the honest lens' last layer is the model's output
    assert _metric(table, "logit", "base", 1, "kl") == pytest.approx(0.0, abs=1e-7)
    assert _metric(table, "logit", "base", 1, "agreement") == 1.0
    assert _metric(table, "logit", "base", 1, "war") == 0.5
    # the paper's lens does not read the embedding
    assert set(table.loc[table["lens"] == PAPER_LENS, "layer"]) == {1}
    assert set(table.loc[table["lens"] == "logit", "layer"]) == {0, 1}
    assert set(table.loc[table["lens"] == PAPER_LENS, "fit_split"]) == {"none"}


def test_mismatched_residual_states_are_refused():
    head = EmotionHead(4, 2, 3)
    with pytest.raises(ValueError, match="do not match"):
        logit_lens_table(
            head,
            {"base": torch.zeros(3, 3, 4)},
            "base",
            np.zeros(3, dtype=int),
            2,
            residual_states={"base": torch.zeros(3, 2, 4)},
        )


# ---- a tiny random encoder -----------------------------------------------------------------


def _random_encoder(seed=0):
    from transformers import WhisperConfig, WhisperForAudioClassification

    torch.manual_seed(seed)
    config = WhisperConfig(
        d_model=D_MODEL,
        encoder_layers=N_LAYERS,
        encoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=32,
        num_mel_bins=80,
        max_source_positions=1500,
        num_labels=len(CLASSES),
    )
    encoder = WhisperForAudioClassification(config).encoder.eval()
    with torch.no_grad():  # a final LayerNorm that is not the default weight 1, bias 0
        encoder.layer_norm.weight.uniform_(0.5, 2.0)
        encoder.layer_norm.bias.normal_(0.0, 0.5)
    return encoder


def _run(encoder, lora=False):
    peft_encoder = None
    if lora:
        from peft import get_peft_model

        from serlens.train.lora import lora_config

        lora_settings = {"alpha_per_rank": 2, "dropout": 0.0, "target_modules": ["v_proj"]}
        peft_encoder = get_peft_model(encoder, lora_config(2, lora_settings)).eval()
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in peft_encoder.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        encoder = peft_encoder.base_model.model
    torch.manual_seed(1)
    head = EmotionHead(D_MODEL, len(CLASSES), 8).eval()
    with torch.no_grad():  # large enough logits that the readings differ visibly
        head.classifier.weight.mul_(8.0)
    splits = {
        "train": make_split(8, 1, "tr"),
        "dev": make_split(4, 2, "dv"),
        "test": make_split(6, 3, "te"),
    }
    return TrainedRun(
        model="random",
        method="lora_r2" if lora else "frozen",
        fold=1,
        encoder=encoder,
        head=head,
        splits=splits,
        classes=CLASSES,
        policy="crop",
        max_seconds=30,
        rank=2 if lora else None,
        peft_encoder=peft_encoder,
    )


def _model_and_paper_logits(run):
    """What the model outputs, head(mean_t last_hidden_state_t), and the paper's last reading,
    head(mean_t resid[L]_t), one test utterance at a time, in split order."""
    test = run.splits["test"]
    model, paper = torch.zeros(len(test), len(CLASSES)), torch.zeros(len(test), len(CLASSES))
    with torch.inference_mode():
        for chunk, batch in run.batches(test, 1):
            out = run_encoder(run.encoder, batch)
            model[chunk] = run.head(masked_mean(out.last_hidden_state, out.frame_mask))
            paper[chunk] = run.head(masked_mean(out.resid[-1], out.frame_mask))
    return model, paper


@pytest.fixture(scope="module")
def frozen_run():
    return _run(_random_encoder())


def test_honest_last_layer_is_the_model_output_and_the_papers_is_not(frozen_run):
    run = frozen_run
    table = compute_logit_lens(run, CFG, seed=0)
    assert set(map(tuple, table[["lens", "variant"]].drop_duplicates().to_numpy())) == {
        ("logit", "base"),
        (PAPER_LENS, "base"),
    }
    model, paper = _model_and_paper_logits(run)
    assert not torch.allclose(model, paper, atol=1e-3)  # the final LayerNorm matters here
    with torch.inference_mode():
        for chunk, batch in run.batches(run.splits["test"], 3):
            normalised, residual = pooled_lens_states(run.encoder, batch)
            assert torch.allclose(logit_lens(run.head, normalised)[:, -1], model[chunk], atol=1e-5)
            assert torch.allclose(logit_lens(run.head, residual)[:, -1], paper[chunk], atol=1e-5)
    # honest: KL 0 and agreement 1 at layer L; the paper's: the KL of its last reading
    assert _metric(table, "logit", "base", N_LAYERS, "kl") == pytest.approx(0.0, abs=1e-6)
    assert _metric(table, "logit", "base", N_LAYERS, "agreement") == 1.0
    log_p, log_q = torch.log_softmax(model, -1), torch.log_softmax(paper, -1)
    expected_kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    assert expected_kl > 1e-3
    last_kl = _metric(table, PAPER_LENS, "base", N_LAYERS, "kl")
    assert last_kl == pytest.approx(expected_kl, rel=1e-4)
    expected_agreement = float((model.argmax(-1) == paper.argmax(-1)).float().mean())
    assert _metric(table, PAPER_LENS, "base", N_LAYERS, "agreement") == pytest.approx(
        expected_agreement
    )
    # below L the paper's lens reads resid[l] raw; the honest one LN(resid[l]): they differ too
    honest = table[(table["lens"] == "logit") & (table["layer"] >= 1)]
    ours = table[table["lens"] == PAPER_LENS]
    assert not np.allclose(
        honest.sort_values(["layer", "metric"])["value"],
        ours.sort_values(["layer", "metric"])["value"],
    )


def test_identity_final_layernorm_makes_the_two_lenses_one(frozen_run):
    """With the final LayerNorm replaced by the identity, LN(resid[l]) = resid[l]: the paper's
    rows are the honest ones at every layer it reads, and its last layer the model's output."""
    import dataclasses

    encoder = _random_encoder()
    encoder.layer_norm = torch.nn.Identity()
    run = dataclasses.replace(frozen_run, encoder=encoder)
    table = compute_logit_lens(run, CFG, seed=0)
    key = ["variant", "layer", "depth", "metric"]
    honest = table[(table["lens"] == "logit") & (table["layer"] >= 1)].set_index(key)["value"]
    paper = table[table["lens"] == PAPER_LENS].set_index(key)["value"]
    pd.testing.assert_series_equal(paper.sort_index(), honest.sort_index())
    assert _metric(table, PAPER_LENS, "base", N_LAYERS, "kl") == pytest.approx(0.0, abs=1e-6)
    assert _metric(table, PAPER_LENS, "base", N_LAYERS, "agreement") == 1.0


# ---- the workflow's analysis on the states its passes write --------------------------------


@pytest.fixture(scope="module")
def lora_states(tmp_path_factory):
    """A LoRA run on the random encoder, its pass and the base pass written, as the workflow
    reads them (RunData)."""
    tmp = tmp_path_factory.mktemp("paper_lens")
    run = _run(_random_encoder(), lora=True)
    adapted_pass(run, PASS, tmp / "run/states.safetensors")
    base_run, folds = every_utterance(run)
    base_pass(base_run, folds, PASS, tmp / "base/states.safetensors")
    save_file(run.head.state_dict(), str(tmp / "run/head.safetensors"))
    inputs = {
        "states": str(tmp / "run/states.safetensors"),
        "base_states": str(tmp / "base/states.safetensors"),
        "head": str(tmp / "run/head.safetensors"),
    }
    data = RunData("c", "random", parse_method("lora_r2"), 0, 1, CLASSES, inputs)
    data.splits = run.splits
    test = run.splits["test"].utt_ids
    data.speakers = {u: ("s1" if i % 2 else "s2") for i, u in enumerate(test)}
    return run, data, tmp


def _analyse(data):
    settings = Settings("analysis logit_lens", SETTINGS)
    table = ANALYSES["logit_lens"].compute(data, settings)
    assert settings.accessed == set(ANALYSES["logit_lens"].keys)
    return table


def test_the_passes_store_the_pre_layernorm_last_layer(lora_states):
    run, _, tmp = lora_states
    own = States(tmp / "run/states.safetensors")
    base = States(tmp / "base/states.safetensors")
    assert own.metadata["states_format"] == base.metadata["states_format"] == str(STATES_FORMAT)
    assert "test/resid_last" in own.keys and "all/resid_last" in base.keys
    assert not {"train/resid_last", "dev/resid_last"} & own.keys  # the lens reads test only
    test = run.splits["test"]
    with torch.inference_mode():
        for variant, stored in (("adapted", own), ("base", base.fold_view(1))):
            expected = np.zeros(stored["test/pooled"].shape, dtype=np.float32)
            for chunk, batch in run.batches(test, 1):
                if variant == "base":
                    with run.adapter_disabled():
                        expected[chunk] = pooled_lens_states(run.encoder, batch)[1].numpy()
                else:
                    expected[chunk] = pooled_lens_states(run.encoder, batch)[1].numpy()
            raw = raw_residual_states(stored["test/pooled"], stored["test/resid_last"])
            np.testing.assert_allclose(raw, expected, atol=2e-5)
            # the stored last layer of ``pooled`` is normalised; ``resid_last`` is not
            assert np.abs(stored["test/pooled"][:, -1] - stored["test/resid_last"]).max() > 1e-3
    # a pass setting: raising the format reruns the passes
    from serlens.config import validate_config

    for ab in (True, False):
        assert pass_settings(validate_config({}), ab=ab)["states_format"] == STATES_FORMAT


def test_analysis_has_both_lenses_for_both_variants(lora_states):
    run, data, _ = lora_states
    table = _analyse(data)
    assert set(map(tuple, table[["lens", "variant"]].drop_duplicates().to_numpy())) == {
        ("logit", "adapted"),
        ("logit", "base"),
        (PAPER_LENS, "adapted"),
        (PAPER_LENS, "base"),
    }
    for lens in ("logit", PAPER_LENS):
        assert set(table.loc[table["lens"] == lens, "metric"]) == {
            "uar",
            "war",
            "agreement",
            "kl",
            "entropy",
        }
    # per-speaker rows for the paper's lens as for the honest one
    paper = table[(table["lens"] == PAPER_LENS) & (table["variant"] == "adapted")]
    assert set(paper["layer"]) == set(range(1, N_LAYERS + 1))
    assert len(paper) == N_LAYERS * (1 + 4 * 2)  # one uar row, four metrics x two speakers
    # the honest last layer is the run's output; the paper's is not (known answer)
    model, paper_logits = _model_and_paper_logits(run)
    assert _metric(table, "logit", "adapted", N_LAYERS, "kl") == pytest.approx(0.0, abs=1e-6)
    assert _metric(table, "logit", "adapted", N_LAYERS, "agreement") == 1.0
    log_p, log_q = torch.log_softmax(model, -1), torch.log_softmax(paper_logits, -1)
    expected_kl = float((log_p.exp() * (log_p - log_q)).sum(-1).double().mean())
    assert expected_kl > 1e-3
    last_kl = _metric(table, PAPER_LENS, "adapted", N_LAYERS, "kl")
    assert last_kl == pytest.approx(expected_kl, rel=1e-4)
    agreement = float((model.argmax(-1) == paper_logits.argmax(-1)).double().mean())
    assert _metric(table, PAPER_LENS, "adapted", N_LAYERS, "agreement") == pytest.approx(agreement)
    # the base rows of the paper's lens read the pre-trained encoder with the run's head,
    # against the run's own output (as the honest base rows)
    assert not np.allclose(
        paper.sort_values(["layer", "metric", "speaker"])["value"],
        table[(table["lens"] == PAPER_LENS) & (table["variant"] == "base")].sort_values(
            ["layer", "metric", "speaker"]
        )["value"],
    )


def test_states_of_an_older_pass_still_give_the_honest_rows(lora_states, tmp_path, caplog):
    """A states file without ``resid_last`` (format 1) loads; the analysis writes the honest
    rows, the same as from the new file, and says that the paper's need a rerun of its pass."""
    run, data, tmp = lora_states
    new = _analyse(data)
    for name in ("run", "base"):
        states = States(tmp / name / "states.safetensors")
        keep = [k for k in states.keys if not k.endswith("/resid_last")]
        arrays: dict = {}
        for key in keep:
            split, array = key.split("/", 1)
            arrays.setdefault(split, {})[array] = states[key]
        ids = {k.removesuffix("/utt_ids"): json_ids for k, json_ids in _ids(states).items()}
        write_states(tmp_path / name / "states.safetensors", arrays, ids)
    old = RunData(
        "c",
        "random",
        parse_method("lora_r2"),
        0,
        1,
        CLASSES,
        {
            "states": str(tmp_path / "run/states.safetensors"),
            "base_states": str(tmp_path / "base/states.safetensors"),
            "head": data.inputs["head"],
        },
    )
    old.splits, old.speakers = data.splits, data.speakers
    with caplog.at_level(logging.WARNING, logger="serlens.analysis.logit_lens"):
        table = _analyse(old)
    assert "resid_last" in caplog.text and "rerun" in caplog.text
    assert set(table["lens"]) == {"logit"}
    pd.testing.assert_frame_equal(table, new[new["lens"] == "logit"].reset_index(drop=True))


def _ids(states):
    import json

    return {k: json.loads(v) for k, v in states.metadata.items() if k.endswith("/utt_ids")}


# ---- the figure ------------------------------------------------------------------------------


def _aggregated(with_paper: bool) -> pd.DataFrame:
    """An aggregated logit-lens table (the columns the figure reads) of a frozen and a LoRA run."""
    rng = np.random.default_rng(0)
    out = []
    lenses = [("logit", range(N_LAYERS + 1))]
    if with_paper:
        lenses.append((PAPER_LENS, range(1, N_LAYERS + 1)))
    for method, variant in (("frozen", "base"), ("lora_r4", "adapted")):
        for lens, layers in lenses:
            for layer in layers:
                for metric in ("uar", "agreement", "kl"):
                    out.append(
                        {
                            "model": "m",
                            "method": method,
                            "lens": lens,
                            "variant": variant,
                            "layer": layer,
                            "depth": layer / N_LAYERS,
                            "metric": metric,
                            "mean": rng.uniform(0.1, 0.9),
                            "std": 0.05,
                            "band_low": np.nan,
                            "band_high": np.nan,
                            "n_folds": 2,
                            "n_seeds": 1,
                        }
                    )
    return pd.DataFrame(out)


def test_figure_draws_the_papers_lens_dashed_over_the_logit_lens():
    from serlens.report import figures
    from serlens.report.figures import lens as lens_figure

    assert lens_figure.PAPER_LENS == PAPER_LENS  # the figure's copy of the analysis' name
    with_paper = figures.logit_lens_figure(_aggregated(True), "m", 4)
    without = figures.logit_lens_figure(_aggregated(False), "m", 4)
    colors = figures.method_colors(["frozen", "lora_r4"])

    def paper_lines(fig):
        return [
            line
            for ax in fig.axes
            for line in ax.get_lines()
            if len(line.get_xdata()) == N_LAYERS and line.get_xdata()[0] == 1 / N_LAYERS
        ]

    drawn = paper_lines(with_paper)
    assert len(drawn) == 2 * 3  # two methods x three panels of the logit lens' row
    assert {line.get_color() for line in drawn} == set(colors.values())
    assert all(line.get_linestyle() != "-" for line in drawn)
    assert paper_lines(without) == []
    legend = [t.get_text() for leg in with_paper.legends for t in leg.get_texts()]
    assert any("paper's logit lens" in text for text in legend)
    assert not any(
        "paper's logit lens" in t.get_text() for leg in without.legends for t in leg.get_texts()
    )
