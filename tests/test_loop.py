"""The training loop on tiny CPU modules: non-finite steps, resume, random states in checkpoints."""

import logging
import random

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import serlens.train.loop as loop
from serlens.train.loop import (
    LoopConfig,
    NonFiniteTrainingError,
    epoch_generator,
    fit,
    minibatches,
)

N_TRAIN, BATCH = 16, 4  # 4 steps per epoch
TIMING = ("epoch_s", "utt_per_s")


class Killed(Exception):
    pass


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 2))


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_params(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Task:
    """Data, batches and a loss whose known batches give a NaN loss or a NaN gradient.

    ``poison`` maps (epoch, batch index) to "loss" (the loss itself is NaN) or "grad" (the loss
    is finite, its gradient is NaN). The loss also draws from torch (dropout), numpy and python's
    global random streams, so a resume that restores any of them wrongly shows in the losses.
    """

    def __init__(self, model, poison=None):
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(N_TRAIN, 3, generator=gen)
        self.y = (self.x[:, 0] > 0).long()
        self.x_dev = torch.randn(8, 3, generator=gen)
        self.y_dev = (self.x_dev[:, 0] > 0).long()
        self.model, self.poison = model, poison or {}
        self.calls = []  # (epoch, index, parameters before the step)

    def batches(self, epoch):
        idx = minibatches(N_TRAIN, BATCH, epoch_generator(0, epoch))
        return [(epoch, i, b) for i, b in enumerate(idx)]

    def loss_on(self, batch):
        epoch, i, idx = batch
        self.calls.append((epoch, i, params_of(self.model)))
        idx = torch.as_tensor(idx)
        loss = nn.functional.cross_entropy(self.model(self.x[idx]), self.y[idx])
        loss = loss * (1 + 0.05 * np.random.rand()) * (1 + 0.05 * random.random())
        kind = self.poison.get((epoch, i))
        if kind == "loss":
            loss = loss * float("nan")
        elif kind == "grad":
            # 0 * sqrt(0): the value stays finite, d sqrt/du at 0 is inf, inf * 0 is NaN.
            u = self.model[0].weight.sum() * 0
            loss = loss + 0 * torch.sqrt(u)
        return loss, len(idx)

    def dev_uar(self):
        with torch.no_grad():
            pred = self.model(self.x_dev).argmax(1)
        return float((pred == self.y_dev).float().mean()) + 1e-3 * float(
            self.model[2].bias.detach().sum()
        )  # tie-breaker, so the best epoch depends on the trained parameters


def cfg(epochs=3):
    return LoopConfig(epochs=epochs, patience=10, lr=0.05, warmup_fraction=0.25, seed=0)


def run(task, epochs=3, checkpoint=None, kill_after=None):
    def on_epoch_end(epoch):
        if epoch == kill_after:
            raise Killed

    return fit(
        task.model,
        task.batches,
        task.loss_on,
        task.dev_uar,
        cfg(epochs),
        checkpoint,
        desc="tiny",
        on_epoch_end=on_epoch_end,
    )


def scramble_rngs():
    """What a fresh process does: the global streams are not where the killed run left them."""
    torch.manual_seed(999)
    np.random.seed(999)
    random.seed(999)


def comparable(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


# (a) non-finite steps are skipped, counted and logged -------------------------------------------


def test_non_finite_steps_are_skipped_counted_and_logged(caplog):
    poison = {(1, 2): "loss", (2, 0): "grad", (2, 3): "loss"}
    task = Task(make_model(), poison)
    with caplog.at_level(logging.WARNING, logger="serlens.train.loop"):
        result = run(task, epochs=3)

    assert [h["skipped_steps"] for h in result.history] == [1, 2, 0]
    assert "skipped_steps" in pd.DataFrame(result.history).columns
    assert all(np.isfinite(h["train_loss"]) for h in result.history)

    # The parameters before the step after a poisoned one equal those before the poisoned one;
    # every other step changes them (so the comparison can tell a step from no step).
    calls = task.calls
    assert len(calls) == 12
    for (epoch, i, before), (_, _, after) in zip(calls, calls[1:], strict=False):
        if (epoch, i) in poison:
            assert same_params(before, after), (epoch, i)
        else:
            assert not same_params(before, after), (epoch, i)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("epoch 1" in m and "skipped 1 of 4" in m for m in warnings), warnings
    assert any("epoch 2" in m and "skipped 2 of 4" in m for m in warnings), warnings
    assert not any("epoch 3" in m for m in warnings), warnings


def test_skipped_steps_leave_no_nan_gradients_behind():
    task = Task(make_model(), {(1, 3): "grad"})  # the last step of the run
    run(task, epochs=1)
    assert all(p.grad is None for p in task.model.parameters())


# (b) an epoch that never trained is an error ---------------------------------------------------


@pytest.mark.parametrize("bad_epoch", [1, 2])
def test_an_epoch_of_only_non_finite_steps_raises(tmp_path, bad_epoch):
    poison = {(bad_epoch, i): ("loss", "grad")[i % 2] for i in range(4)}
    task = Task(make_model(), poison)
    ckpt = tmp_path / "last.pt"
    with pytest.raises(NonFiniteTrainingError, match=f"epoch {bad_epoch}: all 4 steps") as info:
        run(task, epochs=3, checkpoint=ckpt)
    assert "lower learning rate" in str(info.value) and "train.grad_clip" in str(info.value)
    # The checkpoint still holds the last epoch that trained, not the one that did not.
    if bad_epoch == 1:
        assert not ckpt.exists()
    else:
        assert torch.load(ckpt, weights_only=True)["epoch"] == bad_epoch - 1


def test_some_but_not_all_skipped_steps_do_not_raise():
    poison = {(1, i): "loss" for i in range(3)}
    result = run(Task(make_model(), poison), epochs=1)
    assert result.history[0]["skipped_steps"] == 3


# (c) a resumed run ends as an uninterrupted one ------------------------------------------------

POISON = {(1, 1): "loss", (3, 2): "grad"}


@pytest.mark.parametrize("kill_after", [1, 2, 3])
def test_resume_ends_as_an_uninterrupted_run(tmp_path, kill_after):
    scramble_rngs()
    full_model = make_model()
    full = run(Task(full_model, POISON), epochs=4)

    scramble_rngs()
    ckpt = tmp_path / "last.pt"
    with pytest.raises(Killed):
        run(Task(make_model(), POISON), epochs=4, checkpoint=ckpt, kill_after=kill_after)
    assert torch.load(ckpt, weights_only=True)["epoch"] == kill_after

    scramble_rngs()
    resumed_model = make_model(seed=5)  # the checkpoint, not the init, sets the parameters
    resumed_task = Task(resumed_model, POISON)
    resumed = run(resumed_task, epochs=4, checkpoint=ckpt)

    assert resumed_task.calls[0][0] == kill_after + 1  # it did resume, not start over
    assert comparable(resumed.history) == comparable(full.history)
    assert [h["skipped_steps"] for h in resumed.history] == [1, 0, 1, 0]
    assert (resumed.best_epoch, resumed.best_dev_uar) == (full.best_epoch, full.best_dev_uar)
    assert resumed.stopped_early == full.stopped_early
    assert same_params(params_of(resumed_model), params_of(full_model))


@pytest.mark.parametrize(
    "target, name",
    [(torch, "set_rng_state"), (np.random, "set_state"), (random, "setstate")],
    ids=["torch", "numpy", "python"],
)
def test_resume_without_one_random_state_differs(tmp_path, monkeypatch, target, name):
    """Each of the three CPU streams matters here, so the resume test above can fail."""
    scramble_rngs()
    full = run(Task(make_model(), POISON), epochs=3)
    scramble_rngs()
    ckpt = tmp_path / "last.pt"
    with pytest.raises(Killed):
        run(Task(make_model(), POISON), epochs=3, checkpoint=ckpt, kill_after=1)
    scramble_rngs()
    monkeypatch.setattr(target, name, lambda *a, **k: None)
    resumed = run(Task(make_model(), POISON), epochs=3, checkpoint=ckpt)
    assert comparable(resumed.history)[0] == comparable(full.history)[0]
    assert comparable(resumed.history)[1:] != comparable(full.history)[1:]


def test_resume_from_a_checkpoint_with_only_the_torch_state(tmp_path):
    """Checkpoints from before numpy, python and CUDA states were saved still resume."""
    ckpt = tmp_path / "last.pt"
    with pytest.raises(Killed):
        run(Task(make_model(), POISON), epochs=3, checkpoint=ckpt, kill_after=1)
    saved = torch.load(ckpt, weights_only=True)
    saved["rng"] = saved["rng"]["torch"]
    torch.save(saved, ckpt)
    resumed = run(Task(make_model(), POISON), epochs=3, checkpoint=ckpt)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]


# (d) the CUDA random state ---------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_checkpoint_holds_the_cuda_random_state(tmp_path):
    ckpt = tmp_path / "last.pt"
    run(Task(make_model()), epochs=1, checkpoint=ckpt)
    saved = torch.load(ckpt, weights_only=True)["rng"]["cuda"]
    now = torch.cuda.get_rng_state_all()
    assert len(saved) == len(now) == torch.cuda.device_count()
    assert all(torch.equal(a, b) for a, b in zip(saved, now, strict=True))


class FakeCuda:
    """Stands in for the CUDA generators: each get returns a new state, each set is recorded."""

    def __init__(self, monkeypatch, available=True):
        self.gets, self.sets = 0, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set)

    def get(self):
        self.gets += 1
        return [torch.tensor([self.gets, 7], dtype=torch.uint8)]

    def set(self, states):
        self.sets.append([s.clone() for s in states])


def write_checkpoint(tmp_path, monkeypatch, cuda):
    ckpt = tmp_path / "last.pt"
    with monkeypatch.context() as m:
        FakeCuda(m, available=cuda)
        with pytest.raises(Killed):
            run(Task(make_model()), epochs=2, checkpoint=ckpt, kill_after=1)
    return ckpt


def cuda_warnings(caplog):
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
        and "CUDA random state could not be restored" in r.getMessage()
    ]


def test_cuda_state_is_saved_and_restored(tmp_path, monkeypatch, caplog):
    ckpt = tmp_path / "last.pt"
    fake = FakeCuda(monkeypatch)
    with pytest.raises(Killed):
        run(Task(make_model()), epochs=2, checkpoint=ckpt, kill_after=1)
    saved = torch.load(ckpt, weights_only=True)["rng"]["cuda"]
    assert fake.gets == 1 and torch.equal(saved[0], torch.tensor([1, 7], dtype=torch.uint8))

    with caplog.at_level(logging.WARNING, logger="serlens.train.loop"):
        result = run(Task(make_model()), epochs=2, checkpoint=ckpt)
    assert len(fake.sets) == 1
    assert len(fake.sets[0]) == 1 and torch.equal(fake.sets[0][0], saved[0])
    assert cuda_warnings(caplog) == []
    assert [h["epoch"] for h in result.history] == [1, 2]


def test_cpu_checkpoint_resumed_with_cuda_warns(tmp_path, monkeypatch, caplog):
    ckpt = write_checkpoint(tmp_path, monkeypatch, cuda=False)
    assert "cuda" not in torch.load(ckpt, weights_only=True)["rng"]
    fake = FakeCuda(monkeypatch, available=True)
    with caplog.at_level(logging.WARNING, logger="serlens.train.loop"):
        result = run(Task(make_model()), epochs=2, checkpoint=ckpt)
    assert fake.sets == []
    (message,) = cuda_warnings(caplog)
    assert "without CUDA" in message
    assert [h["epoch"] for h in result.history] == [1, 2]


def test_cuda_checkpoint_resumed_without_cuda_warns(tmp_path, monkeypatch, caplog):
    ckpt = write_checkpoint(tmp_path, monkeypatch, cuda=True)
    assert "cuda" in torch.load(ckpt, weights_only=True)["rng"]
    fake = FakeCuda(monkeypatch, available=False)
    with caplog.at_level(logging.WARNING, logger="serlens.train.loop"):
        result = run(Task(make_model()), epochs=2, checkpoint=ckpt)
    assert fake.sets == []
    (message,) = cuda_warnings(caplog)
    assert "not available" in message
    assert [h["epoch"] for h in result.history] == [1, 2]


def test_cuda_state_that_fails_to_restore_warns(tmp_path, monkeypatch, caplog):
    ckpt = write_checkpoint(tmp_path, monkeypatch, cuda=True)
    FakeCuda(monkeypatch, available=True)

    def refuse(states):
        raise RuntimeError("invalid device ordinal")

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse)
    with caplog.at_level(logging.WARNING, logger="serlens.train.loop"):
        result = run(Task(make_model()), epochs=2, checkpoint=ckpt)
    (message,) = cuda_warnings(caplog)
    assert "invalid device ordinal" in message
    assert [h["epoch"] for h in result.history] == [1, 2]


def test_random_state_in_checkpoint_is_plain(tmp_path):
    """The saved states are tensors and plain values, so ``weights_only=True`` loads them."""
    ckpt = tmp_path / "last.pt"
    run(Task(make_model()), epochs=1, checkpoint=ckpt)
    rng = torch.load(ckpt, weights_only=True)["rng"]
    assert {"torch", "numpy", "python"} <= rng.keys()
    assert isinstance(rng["numpy"]["key"], torch.Tensor) and rng["numpy"]["key"].numel() == 624
    assert loop._rng_state()["torch"].dtype == torch.uint8
