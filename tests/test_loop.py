"""The one training loop (trainer/loop.py) on synthetic objectives: stops on a non-finite or
diverging loss, records every step when loss values are read back only every few steps, the
optimizer choices, and its state for resume (optimizer moments + generator)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_domainstudio.trainer.errors import TrainingError
from comfyui_domainstudio.trainer.loop import (DIVERGENCE_FACTOR, DIVERGENCE_WINDOW, OPTIMIZERS, Loop, LoopSpec, Rng,
                                               make_optimizer)


pytestmark = pytest.mark.usefixtures("one_thread")


class Quadratic:
    """A noisy least-squares objective: fit w [4, 3] and b [4] to y = x @ A + c on batches drawn
    from the loop's generator (so a run is reproducible and the generator state matters)."""

    terms = ("fit", "reg")

    def __init__(self, w: torch.Tensor, b: torch.Tensor):
        self.w, self.b = w, b
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(3, 4, generator=g)
        self.c = torch.randn(4, generator=g)
        self.calls = 0

    def __call__(self, rng: Rng):
        self.calls += 1
        x = torch.randn(8, 3, generator=rng.cpu)
        y = x @ self.a + self.c
        fit = ((x @ self.w.T + self.b - y) ** 2).mean()
        reg = 1e-3 * (self.w**2).sum()
        return fit + reg, {"fit": fit, "reg": reg}


def params(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.zeros(4))


class Scripted:
    """An objective whose total follows a script of values (and carries a gradient to `p`)."""

    terms = ()

    def __init__(self, p: torch.Tensor, values):
        self.p, self.values, self.calls = p, list(values), 0

    def __call__(self, rng: Rng):
        v = self.values[self.calls]
        self.calls += 1
        total = (self.p * 0).sum() + torch.tensor(float(v))
        return total, {}


# ------------------------------------------------------------------ basics


def test_loop_trains_records_and_reports_every_step():
    w, b = params()
    obj = Quadratic(w, b)
    seen = []
    loop = Loop(obj, [w, b], LoopSpec("train", 40, 0.05, seed=3))
    loop.run(on_step=lambda r: seen.append((r.stage, r.step, r.steps, r.losses)))
    assert loop.done and loop.step == 40 and obj.calls == 40
    assert [s for _, s, _, _ in seen] == list(range(1, 41)) and all(st == "train" for st, _, _, _ in seen)
    assert all(n == 40 and losses is not None for _, _, n, losses in seen)
    h = loop.history
    assert h.steps == list(range(1, 41)) and set(h.values) == {"total", "fit", "reg"}
    assert [l["total"] for *_, l in seen] == h.values["total"]
    assert h.values["total"][-1] < 0.3 * h.values["total"][0]
    assert loop.seconds > 0


def test_run_in_pieces_equals_one_run():
    w1, b1 = params()
    one = Loop(Quadratic(w1, b1), [w1, b1], LoopSpec("train", 12, 0.05, seed=3))
    one.run()
    w2, b2 = params()
    pieces = Loop(Quadratic(w2, b2), [w2, b2], LoopSpec("train", 12, 0.05, seed=3))
    for until in (3, 7, 7, 12, 20):
        pieces.run(until=until)
    assert pieces.step == 12 and pieces.history.steps == list(range(1, 13))
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    assert one.history.values == pieces.history.values


def test_nothing_to_train_is_refused():
    frozen = torch.zeros(3)
    with pytest.raises(TrainingError, match="token: nothing to train"):
        Loop(Scripted(frozen, [1.0]), [frozen], LoopSpec("token", 1, 0.1))


# ------------------------------------------------------------------ non-finite loss


@pytest.mark.parametrize("sync_every", [1, 4])
def test_nan_stops_naming_the_step_and_the_learning_rate(sync_every):
    w = torch.nn.Parameter(torch.ones(3))
    obj = Scripted(w, [1.0, 0.9, 0.8, 0.7, 0.6, float("nan"), 0.5, 0.4, 0.3, 0.2])
    reports = []
    loop = Loop(obj, [w], LoopSpec("unet", 10, 3e-4, sync_every=sync_every))
    with pytest.raises(TrainingError) as e:
        loop.run(on_step=lambda r: reports.append((r.step, r.losses)))
    msg = str(e.value)
    assert "unet: loss became nan at step 6" in msg and "now 0.0003" in msg and "Lower the learning rate" in msg
    assert loop.history.steps == [1, 2, 3, 4, 5]  # everything before the bad step is recorded
    if sync_every == 1:
        # checked before backward: the NaN step is never taken, the weights stay finite
        assert [s for s, _ in reports] == [1, 2, 3, 4, 5] and obj.calls == 6 and torch.isfinite(w).all()
    else:
        # read back at step 8 (the next sync): steps 6 and 7 ran, then the loop stopped
        assert [s for s, _ in reports] == [1, 2, 3, 4, 5, 6, 7] and obj.calls == 8
        assert [s for s, l in reports if l is not None] == [4]


def test_sync_every_still_records_every_step():
    w, b = params()
    reports = []
    loop = Loop(Quadratic(w, b), [w, b], LoopSpec("train", 10, 0.05, sync_every=4))
    loop.run(on_step=lambda r: reports.append((r.step, r.losses)))
    assert [s for s, _ in reports] == list(range(1, 11))
    assert [s for s, l in reports if l is not None] == [4, 8, 10]  # synced, and at the end
    assert loop.history.steps == list(range(1, 11)) and len(loop.history.values["fit"]) == 10
    # same values as a loop that syncs every step
    w2, b2 = params()
    ref = Loop(Quadratic(w2, b2), [w2, b2], LoopSpec("train", 10, 0.05, sync_every=1))
    ref.run()
    assert ref.history.values == loop.history.values


# ------------------------------------------------------------------ divergence


def test_a_loss_that_climbs_a_thousandfold_stops_with_the_hint():
    w = torch.nn.Parameter(torch.ones(3))
    values = [2.0 * 4.0**i for i in range(30)]  # x4 per step: 1000x within ~6 steps
    loop = Loop(Scripted(w, values), [w], LoopSpec("train", 30, 1.0))
    with pytest.raises(TrainingError) as e:
        loop.run()
    msg = str(e.value)
    assert "train: the loss diverged" in msg and "Lower the learning rate (now 1)" in msg
    assert "lambda" in msg
    stopped = loop.history.steps[-1]
    assert f"at step {stopped}" in msg
    start = max(values[:DIVERGENCE_WINDOW])
    recent = sorted(values[stopped - DIVERGENCE_WINDOW:stopped])[DIVERGENCE_WINDOW // 2]
    assert recent > DIVERGENCE_FACTOR * start  # it stopped once the median of 5 passed 1000x ...
    before = sorted(values[stopped - 1 - DIVERGENCE_WINDOW:stopped - 1])[DIVERGENCE_WINDOW // 2]
    assert before <= DIVERGENCE_FACTOR * start  # ... and not a step earlier
    assert stopped < 30


def test_a_noisy_healthy_loss_and_single_spikes_do_not_stop():
    g = torch.Generator().manual_seed(0)
    # noisy (a factor ~10 up and down around a slowly falling level) with rare 3000x spikes
    values = [float(torch.exp(torch.randn((), generator=g) * 1.2)) * (1.0 - 0.002 * i) for i in range(300)]
    for i in (50, 51, 200):
        values[i] = 3000.0
    w = torch.nn.Parameter(torch.ones(3))
    loop = Loop(Scripted(w, values), [w], LoopSpec("train", 300, 1e-4))
    loop.run()
    assert loop.done and len(loop.history.steps) == 300
    assert max(values) / min(values) > 1000  # the loss did span far more than the factor


def test_a_falling_loss_never_counts_as_divergence():
    w = torch.nn.Parameter(torch.ones(3))
    loop = Loop(Scripted(w, [1e6 * 0.5**i for i in range(60)]), [w], LoopSpec("train", 60, 1e-4))
    loop.run()
    assert loop.done


# ------------------------------------------------------------------ optimizers


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adafactor", torch.optim.Adafactor)])
def test_optimizer_choices_train(name, cls):
    w, b = params()
    loop = Loop(Quadratic(w, b), [w, b], LoopSpec("train", 60, 0.05, optimizer=name, weight_decay=0.01))
    assert type(loop.optimizer) is cls
    assert loop.optimizer.param_groups[0]["lr"] == 0.05 and loop.optimizer.param_groups[0]["weight_decay"] == 0.01
    loop.run()
    total = loop.history.values["total"]
    assert total[-1] < 0.5 * total[0], (name, total[0], total[-1])


def test_unknown_optimizer_is_refused_with_the_choices():
    assert OPTIMIZERS == ("adamw", "adafactor")
    with pytest.raises(TrainingError, match="optimizer='sgd' is unknown; choose one of adamw, adafactor"):
        make_optimizer([torch.nn.Parameter(torch.ones(2))], LoopSpec("train", 1, 0.1, optimizer="sgd"))


def test_max_grad_norm_zero_turns_clipping_off():
    grads = {}
    for norm in (0.0, 1e-3):
        w = torch.nn.Parameter(torch.full((3,), 10.0))

        class Big:
            terms = ()

            def __call__(self, rng):
                return (w**2).sum() * 100, {}

        loop = Loop(Big(), [w], LoopSpec("train", 1, 1e-3, max_grad_norm=norm))
        loop.run()
        grads[norm] = float(torch.linalg.vector_norm(w.grad))
    assert grads[0.0] == pytest.approx(2 * 10 * 100 * math.sqrt(3), rel=1e-5)
    assert grads[1e-3] == pytest.approx(1e-3, rel=1e-3)


# ------------------------------------------------------------------ state for resume


def _through_file(state: dict, tmp_path) -> dict:
    """The loop state as the .dsstate sidecar stores it: tensors in safetensors, header as JSON."""
    path = str(tmp_path / "state.safetensors")
    save_file({k: v.contiguous() for k, v in state["tensors"].items()}, path,
              metadata={"h": json.dumps(state["header"])})
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        header = json.loads(f.metadata()["h"])
    return {"tensors": load_file(path), "header": header}


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_state_dict_round_trip_continues_bit_identically(optimizer, tmp_path):
    spec = LoopSpec("train", 12, 0.05, seed=5, optimizer=optimizer, weight_decay=0.01)
    w1, b1 = params()
    full = Loop(Quadratic(w1, b1), [w1, b1], spec)
    full.run()

    w2, b2 = params()
    first = Loop(Quadratic(w2, b2), [w2, b2], spec)
    first.run(until=5)
    state = _through_file(first.state_dict(), tmp_path)
    assert state["header"]["step"] == 5 and state["header"]["optimizer"] == optimizer
    assert "rng.cpu" in state["tensors"] and any(k.startswith("opt.") for k in state["tensors"])

    w3, b3 = w2.detach().clone().requires_grad_(), b2.detach().clone().requires_grad_()
    w3, b3 = torch.nn.Parameter(w3), torch.nn.Parameter(b3)
    resumed = Loop(Quadratic(w3, b3), [w3, b3], spec)
    resumed.load_state_dict(state)
    assert resumed.step == 5
    resumed.run()
    assert resumed.step == 12 and resumed.history.steps == list(range(6, 13))
    assert torch.equal(w1, w3) and torch.equal(b1, b3)
    assert resumed.history.values["total"] == full.history.values["total"][5:]

    # without the optimizer and generator state the continuation differs
    w4, b4 = torch.nn.Parameter(w2.detach().clone()), torch.nn.Parameter(b2.detach().clone())
    fresh = Loop(Quadratic(w4, b4), [w4, b4], spec)
    fresh.step = 5
    fresh.run()
    assert not torch.equal(w1, w4)


def test_resume_refuses_another_optimizer_and_the_saved_lr_does_not_win():
    w, b = params()
    loop = Loop(Quadratic(w, b), [w, b], LoopSpec("train", 4, 0.05, optimizer="adamw"))
    loop.run(until=2)
    state = loop.state_dict()
    w2, b2 = params()
    other = Loop(Quadratic(w2, b2), [w2, b2], LoopSpec("train", 4, 0.05, optimizer="adafactor"))
    with pytest.raises(TrainingError, match="saved optimizer state is for 'adamw'.*resume with the same optimizer"):
        other.load_state_dict(state)
    slower = Loop(Quadratic(w2, b2), [w2, b2], LoopSpec("train", 4, 0.01, optimizer="adamw"))
    slower.load_state_dict(state)
    assert slower.optimizer.param_groups[0]["lr"] == 0.01


def test_rng_is_one_stream_on_the_cpu_and_seeded():
    r = Rng.seeded(7)
    assert r.cpu is r.device
    a = torch.randn(3, generator=r.cpu)
    state = r.state()
    assert set(state) == {"rng.cpu"}
    b = torch.randn(3, generator=r.device)
    r2 = Rng.seeded(0)
    r2.load_state(state)
    assert torch.equal(torch.randn(3, generator=r2.cpu), b)
    assert torch.equal(torch.randn(3, generator=Rng.seeded(7).cpu), a)


def test_rng_with_a_separate_device_generator_saves_and_restores_both():
    # On a GPU the batch indices come from a CPU generator and the noise from the device's own one.
    r = Rng(torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    torch.randn(4, generator=r.cpu), torch.randn(4, generator=r.device)
    state = r.state()
    assert set(state) == {"rng.cpu", "rng.device"}
    want = torch.randn(3, generator=r.cpu), torch.randn(3, generator=r.device)
    r2 = Rng(torch.Generator().manual_seed(9), torch.Generator().manual_seed(9))
    r2.load_state(state)
    got = torch.randn(3, generator=r2.cpu), torch.randn(3, generator=r2.device)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and not torch.equal(got[0], got[1])
