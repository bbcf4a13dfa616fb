"""The paper's protocol as named deviations: its folds, test-fold selection, 30-s padding
with all-frame pooling, and protocol_gap.tsv against the honest runs."""

import numpy as np
import pandas as pd
import pytest
import torch
from test_train import CLASSES, config, make_split

from serlens.audio import LogMel
from serlens.config import validate_config
from serlens.corpus.folds import dialog_prefix_folds, leave_one_session_out, prefix_fold_numbers
from serlens.errors import ConfigError, CorpusError
from serlens.methods import PAPER_PROTOCOL, configured_methods
from serlens.metrics import uar
from serlens.models.encoder import load_encoder, masked_mean, run_encoder
from serlens.report.protocol import gap_row, protocol_gap_table, selected_on_test
from serlens.train.data import label_indices
from serlens.train.lora import pooled, run_encoder_method


def iemocap_manifest(sessions=5, per_speaker=6) -> pd.DataFrame:
    """Utterances named as IEMOCAP names them: dialog Ses0kF_/Ses0kM_, both actors in each."""
    rows = []
    for k in range(1, sessions + 1):
        for role in "FM":
            for gender in "FM":
                for i in range(per_speaker // 2):
                    rows.append(
                        {
                            "utt_id": f"Ses{k:02d}{role}_impro01_{gender}{i:03d}",
                            "session": str(k),
                            "speaker": f"Ses{k:02d}{gender}",
                            "gender": gender,
                            "label": CLASSES[i % 4],
                        }
                    )
    return pd.DataFrame(rows)


def speakers_of(manifest, folds, fold, split):
    ids = folds.loc[(folds["fold"] == fold) & (folds["split"] == split), "utt_id"]
    return set(manifest.set_index("utt_id").loc[ids, "speaker"])


def test_prefix_folds_put_both_speakers_of_a_session_in_train_and_test():
    manifest = iemocap_manifest()
    prefix = dialog_prefix_folds(manifest)
    honest = leave_one_session_out(manifest)
    assert sorted(prefix["fold"].unique()) == list(range(1, 11))
    for fold in range(1, 11):
        test = speakers_of(manifest, prefix, fold, "test")
        assert len(test) == 2 and test <= speakers_of(manifest, prefix, fold, "train")
        assert not test & speakers_of(manifest, prefix, fold, "dev")
    for fold in range(1, 6):
        test = speakers_of(manifest, honest, fold, "test")
        assert not test & speakers_of(manifest, honest, fold, "train")
        # the prefix folds 2k - 1 and 2k test exactly honest fold k's utterances
        halves = prefix[prefix["fold"].isin(prefix_fold_numbers([fold])) & (prefix.split == "test")]
        assert set(halves["utt_id"]) == set(
            honest.loc[(honest.fold == fold) & (honest.split == "test"), "utt_id"]
        )


def test_prefix_folds_refuse_ids_without_a_dialog_prefix():
    manifest = iemocap_manifest()
    manifest.loc[0, "utt_id"] = "03a01Fa"
    with pytest.raises(CorpusError, match="03a01Fa.*dialog prefix"):
        dialog_prefix_folds(manifest)


def test_protocol_keys_are_checked():
    with pytest.raises(ConfigError, match=r"methods\.p\.protocol: \['test_folds'\]"):
        configured_methods(
            validate_config(
                {"methods": {"p": {"kind": "lora", "rank": 8, "protocol": ["test_folds"]}}}
            )
        )
    with pytest.raises(ConfigError, match="honest protocol, which the grid lacks"):
        configured_methods(
            validate_config({"methods": {"p": {"kind": "lora", "rank": 4, "protocol": "paper"}}})
        )
    methods = configured_methods(
        validate_config({"methods": {"p": {"kind": "lora", "rank": 8, "protocol": "paper"}}})
    )
    assert methods["p"].protocol == PAPER_PROTOCOL and not methods["p"].honest
    assert methods["p"].input_policy == "pad30" and methods["p"].pools_all_frames
    assert "protocol" not in methods["lora_r8"].train_settings(validate_config({}))


def test_all_frame_pooling_counts_the_padding(weights):
    encoder = load_encoder(weights).eval()
    batch = LogMel()([make_split(1, 0, "x").waves[0]], "pad30")
    with torch.no_grad():
        out = run_encoder(encoder, batch)
        everything = pooled(encoder, batch, all_frames=True)
        audio = pooled(encoder, batch)
    assert batch.frame_mask.sum() < batch.frame_mask.numel()  # a 1-s clip in 30 s
    torch.testing.assert_close(everything, out.last_hidden_state.mean(dim=1))
    torch.testing.assert_close(audio, masked_mean(out.last_hidden_state, out.frame_mask))
    assert not torch.allclose(everything, audio)


@pytest.fixture(scope="module")
def run(weights, tmp_path_factory):
    """A LoRA run of 3 epochs (the test split recorded after each), with a checkpoint folder."""
    methods = configured_methods(validate_config({"lora": {"ranks": [2]}}))
    splits = {
        "train": make_split(8, 0, "tr"),
        "dev": make_split(4, 1, "dv"),
        "test": make_split(8, 2, "te"),
    }
    folder, scratch = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("ckpt")
    cfg = config(3)
    cfg["train"]["lr"] = 3e-3
    run_encoder_method(
        load_encoder(weights),
        splits,
        CLASSES,
        methods["lora_r2"],
        cfg,
        folder,
        scratch / "last.pt",
        {},
    )
    return folder


def test_test_epochs_record_every_epoch_and_the_dev_choice_is_one_of_them(run):
    import json

    epochs = pd.read_csv(run / "test_epochs.tsv", sep="\t")
    history = pd.read_csv(run / "history.tsv", sep="\t")
    predictions = pd.read_csv(run / "predictions.tsv", sep="\t")
    best = json.loads((run / "metrics.json").read_text())["best_epoch"]
    assert sorted(epochs["epoch"].unique()) == history["epoch"].tolist() == [1, 2, 3]
    at_best = epochs[epochs["epoch"] == best]
    # recording did not change what training chose: the dev-selected run's test predictions
    # are the ones recorded at its epoch
    assert at_best["utt_id"].tolist() == predictions["utt_id"].tolist()
    assert at_best["pred"].tolist() == predictions["pred"].tolist()


def test_test_fold_selection_reports_at_least_the_dev_selected_uar(run):
    epochs = pd.read_csv(run / "test_epochs.tsv", sep="\t")
    predictions = pd.read_csv(run / "predictions.tsv", sep="\t")

    def score(frame):
        return uar(label_indices(frame["label"], CLASSES), label_indices(frame["pred"], CLASSES), 4)

    _, chosen = selected_on_test(epochs, CLASSES, "uar")
    assert score(chosen) >= score(predictions)
    per_epoch = [score(rows) for _, rows in epochs.groupby("epoch")]
    assert score(chosen) == pytest.approx(max(per_epoch))


def test_test_selected_takes_the_earliest_of_tied_epochs():
    rows = []
    for epoch, correct in [(1, 2), (2, 3), (3, 3)]:
        for i in range(4):
            rows.append(
                {
                    "epoch": epoch,
                    "utt_id": f"u{i}",
                    "label": "neu",
                    "pred": "neu" if i < correct else "hap",
                }
            )
    epoch, frame = selected_on_test(pd.DataFrame(rows), CLASSES, "war")
    assert epoch == 2 and (frame["pred"] == "neu").sum() == 3


def _constructed(n_speakers=6, per=20, seed=0):
    rng = np.random.default_rng(seed)
    speakers = np.repeat([f"s{k}" for k in range(n_speakers)], per)
    labels = rng.choice(CLASSES, len(speakers))
    preds = np.where(rng.random(len(speakers)) < 0.5, labels, rng.choice(CLASSES, len(speakers)))
    frame = pd.DataFrame(
        {
            "utt_id": [f"u{i}" for i in range(len(speakers))],
            "seed": 0,
            "fold": np.repeat(np.arange(n_speakers) // 2 + 1, per),
            "label": labels,
            "pred": preds,
            "speaker": speakers,
            "epoch": 3,
        }
    )
    return frame


def test_gap_of_an_identical_run_is_zero_and_of_a_perfect_one_is_the_error_rate():
    honest = _constructed()
    same = gap_row(honest, honest.copy(), CLASSES, resamples=200)
    assert same["delta_uar"] == 0 and same["delta_uar_low"] == 0 and same["delta_uar_high"] == 0
    perfect = honest.assign(pred=honest["label"])
    gap = gap_row(honest, perfect, CLASSES, resamples=200)
    war = honest.groupby("fold").apply(lambda f: (f.label == f.pred).mean()).mean()
    assert gap["war"] == 1 and gap["delta_war"] == pytest.approx(1 - war)
    assert gap["war_honest"] == pytest.approx(war)
    assert gap["delta_war_low"] <= gap["delta_war"] <= gap["delta_war_high"]
    assert gap["delta_uar"] == pytest.approx(1 - gap["uar_honest"])


def test_protocol_gap_table_rows(tmp_path):
    methods = configured_methods(
        validate_config(
            {
                "lora": {"ranks": [8]},
                "methods": {"paper": {"kind": "lora", "rank": 8, "protocol": "paper"}},
            }
        )
    )
    honest = _constructed()
    epochs = pd.concat(
        [
            honest.assign(epoch=e, pred=honest["label"] if e == 2 else honest["pred"])
            for e in (1, 2, 3)
        ]
    )
    runs = {}
    for fold, part in honest.groupby("fold"):
        ids = set(part["utt_id"])
        runs[("tiny", "lora_r8", 0, fold)] = (
            part[["utt_id", "label", "pred"]],
            epochs[epochs["utt_id"].isin(ids)][["epoch", "utt_id", "label", "pred"]],
            3,
        )
        middle = len(part) // 2
        for half, chunk in enumerate((part.iloc[:middle], part.iloc[middle:])):
            prefix_fold = 2 * fold - 1 + half
            runs[("tiny", "paper", 0, prefix_fold)] = (
                chunk[["utt_id", "label", "pred"]],
                epochs[epochs["utt_id"].isin(set(chunk["utt_id"]))][
                    ["epoch", "utt_id", "label", "pred"]
                ],
                3,
            )
    manifest = honest[["utt_id", "speaker"]]
    table = protocol_gap_table(runs, manifest, CLASSES, methods, resamples=200)
    by = table.set_index("deviation")
    assert list(by.index) == [
        "test_selection",
        "test_selection_uar",
        "prefix_folds+pad30_all_frames",
        "paper (all together)",
    ]
    # epoch 2 is perfect on the test fold: test-fold selection finds it
    assert by.loc["test_selection", "war"] == 1 and by.loc["test_selection", "epoch"] == 2
    assert by.loc["prefix_folds+pad30_all_frames", "delta_uar"] == pytest.approx(0)
    assert by.loc["paper (all together)", "n_folds"] == 3  # regrouped onto the honest folds
    no_prefix = protocol_gap_table(runs, manifest, CLASSES, methods, prefixes=False, resamples=200)
    row = no_prefix[no_prefix["run_method"] == "paper"].iloc[0]
    assert not row["applies"] and "no dialog prefixes" in row["note"]
