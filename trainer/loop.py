"""The one training loop every method's stages run (nanoGPT-style: what is trained is the caller's
business, how a step is taken lives here).

    objective(rng) -> (total, parts)      a method's loss on one freshly drawn batch
    loop = Loop(objective, params, spec)   AdamW (or another torch optimizer), seeded generators
    loop.run(until=step, on_step=...)      zero_grad -> loss -> backward -> clip -> step

It owns: the optimizer, gradient clipping, the stop on a non-finite or diverging loss, the
progress/cancel callback (after every step), the loss history, and its own state for resume
(optimizer moments, generator, step). Loss values reach Python only every `sync_every` steps
(the rest of the time they stay on the device), so a GPU is not stalled by a host sync per step;
on the CPU syncing costs nothing and happens every step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .errors import TrainingError

OPTIMIZERS = ("adamw", "adafactor")

# A loss that climbs this many times above its starting level is treated as diverged: with the
# default settings the loss of a healthy run moves within a factor of ~10 (it is noisy because
# every step draws new noise levels), while a run whose learning rate is far too high climbs by
# orders of magnitude within tens of steps (lr 1 on full weights: 4.8e7 -> 9.6e9).
DIVERGENCE_FACTOR = 1000.0
DIVERGENCE_WINDOW = 5  # steps whose median is compared (one unlucky batch is not divergence)


class Objective(Protocol):
    """A method's loss. `terms` names what __call__ reports in `parts` ("total" is added here)."""

    terms: tuple[str, ...]

    def __call__(self, rng: "Rng") -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


@dataclass
class Rng:
    """Generators of one loop: `cpu` draws batch indices, `device` noise and noise levels (on the
    training device). On the CPU they are one generator, so a run is one reproducible stream."""

    cpu: torch.Generator
    device: torch.Generator

    @classmethod
    def seeded(cls, seed: int, device: torch.device | str = "cpu") -> "Rng":
        device = torch.device(device)
        cpu = torch.Generator().manual_seed(int(seed))
        if device.type == "cpu":
            return cls(cpu, cpu)
        return cls(cpu, torch.Generator(device=device).manual_seed(int(seed)))

    def state(self) -> dict[str, torch.Tensor]:
        out = {"rng.cpu": self.cpu.get_state()}
        if self.device is not self.cpu:
            out["rng.device"] = self.device.get_state()
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.cpu.set_state(state["rng.cpu"].to(torch.uint8).cpu())
        if self.device is not self.cpu and "rng.device" in state:
            self.device.set_state(state["rng.device"].to(torch.uint8).cpu())


@dataclass
class LoopSpec:
    """How one stage is optimised (filled in by the method from the user's settings)."""

    name: str  # stage name shown in progress and history: "train", "token", "unet"
    steps: int
    learning_rate: float
    seed: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    device: str = "cpu"
    sync_every: int = 1  # how often loss values are read back (progress and checks use them)


def make_optimizer(params: list[torch.Tensor], spec: LoopSpec) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA) or torch's Adafactor (factored second moments: far less optimizer
    state for full fine-tuning); never a hand-written optimizer."""
    if spec.optimizer == "adamw":
        kwargs = {}
        if torch.device(spec.device).type == "cuda" and all(p.is_cuda and p.dtype == torch.float32 for p in params):
            kwargs["fused"] = True
        return torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay, **kwargs)
    if spec.optimizer == "adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise TrainingError("optimizer='adafactor' needs torch >= 2.5 (torch.optim.Adafactor); use 'adamw'")
        return torch.optim.Adafactor(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    raise TrainingError(f"optimizer={spec.optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")


@dataclass
class StepReport:
    """What the progress callback sees after a step. `losses` is None between syncs."""

    stage: str
    step: int
    steps: int
    losses: dict[str, float] | None
    seconds: float  # training time of this stage so far


@dataclass
class History:
    terms: tuple[str, ...]
    values: dict[str, list[float]] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)

    def __post_init__(self):
        for t in self.terms:
            self.values.setdefault(t, [])

    def add(self, step: int, parts: dict[str, float]) -> None:
        self.steps.append(step)
        for t in self.terms:
            self.values[t].append(parts.get(t, 0.0))


class Loop:
    """Optimise `params` on `objective` for spec.steps steps, resumable and runnable in pieces
    (`run(until=...)` can be called repeatedly; previews and periodic saves happen between)."""

    def __init__(self, objective: Objective, params: list[torch.Tensor], spec: LoopSpec):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise TrainingError(f"{spec.name}: nothing to train")
        self.objective = objective
        self.spec = spec
        self.optimizer = make_optimizer(self.params, spec)
        self.rng = Rng.seeded(spec.seed, spec.device)
        self.step = 0
        self.seconds = 0.0
        self.history = History(("total",) + tuple(t for t in objective.terms if t != "total"))
        self._pending: list[tuple[int, dict[str, torch.Tensor]]] = []
        self._start_level: float | None = None

    @property
    def done(self) -> bool:
        return self.step >= self.spec.steps

    def run(self, until: int | None = None, on_step: Callable[[StepReport], None] | None = None) -> None:
        """Take steps step+1 .. until (default: all). on_step runs after every step; an exception
        it raises (Cancel) stops the loop with `step` = the last completed step."""
        until = self.spec.steps if until is None else min(int(until), self.spec.steps)
        t0 = time.perf_counter()
        try:
            while self.step < until:
                self._take_step()
                losses = None
                if (self.step % max(1, self.spec.sync_every) == 0) or self.step == until:
                    losses = self._sync()
                if on_step is not None:
                    on_step(StepReport(self.spec.name, self.step, self.spec.steps, losses,
                                       self.seconds + time.perf_counter() - t0))
        finally:
            self.seconds += time.perf_counter() - t0
        if self._pending:
            self._sync()

    def _take_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        total, parts = self.objective(self.rng)
        if self.spec.sync_every <= 1:
            # Read the loss before backward so a non-finite value never reaches the weights.
            self._check_finite(self.step + 1, float(total.detach()), parts)
        total.backward()
        if self.spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.spec.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        self._pending.append((self.step, {"total": total.detach(), **{k: v.detach() for k, v in parts.items()}}))

    def _sync(self) -> dict[str, float]:
        """Read pending loss values back, record them, and stop on a non-finite or diverging loss."""
        pending, self._pending = self._pending, []
        last = {}
        for step, parts in pending:
            values = {k: float(v) for k, v in parts.items()}
            self._check_finite(step, values["total"], values)
            self.history.add(step, values)
            self._check_divergence(step)
            last = values
        return last

    def _check_finite(self, step: int, total: float, parts) -> None:
        if math.isfinite(total):
            return
        shown = {k: (float(v.detach()) if isinstance(v, torch.Tensor) else v) for k, v in parts.items()}
        raise TrainingError(
            f"{self.spec.name}: loss became {total} at step {step} (parts: {shown}); training stopped and the "
            f"weights of this stage were not kept. Lower the learning rate (now {self.spec.learning_rate:g}), "
            "e.g. by 10x, or lower the lambda weights.")

    def _check_divergence(self, step: int) -> None:
        totals = self.history.values["total"]
        if self._start_level is None:
            if len(totals) >= DIVERGENCE_WINDOW or len(totals) >= self.spec.steps:
                # A learning rate far too high explodes the loss from the second step on (full_all at
                # lr 1: 1.1 -> 2.8e4 -> 1.5e5 ...) and may then settle near its start on a destroyed
                # model, so the first window is first compared with the first step's loss, the only
                # one taken before any update.
                first = abs(totals[0]) or 1e-12
                window = sorted(totals[:DIVERGENCE_WINDOW])
                median = window[len(window) // 2]
                if median > DIVERGENCE_FACTOR * first:
                    self._diverged(step, median, first)
                self._start_level = max(abs(v) for v in totals[:DIVERGENCE_WINDOW]) or 1e-12
            return
        recent = sorted(totals[-DIVERGENCE_WINDOW:])
        median = recent[len(recent) // 2]
        if median > DIVERGENCE_FACTOR * self._start_level:
            self._diverged(step, median, self._start_level)

    def _diverged(self, step: int, level: float, start: float) -> None:
        raise TrainingError(
            f"{self.spec.name}: the loss diverged (around {level:.3g} at step {step}, against "
            f"{start:.3g} at the start); training stopped and the weights of this stage were not "
            f"kept. Lower the learning rate (now {self.spec.learning_rate:g}), e.g. by 10x, or lower the "
            "lambda weights.")

    # --- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor | dict]:
        """Tensors (optimizer moments, generator states) and a JSON-able header, for a sidecar file."""
        opt = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        header = {"step": self.step, "optimizer": self.spec.optimizer, "param_groups": opt["param_groups"],
                  "state_keys": {}}
        for idx, st in opt["state"].items():
            keys = []
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"opt.{idx}.{k}"] = v.detach().cpu()
                    keys.append(k)
                else:
                    header.setdefault("state_scalars", {})[f"{idx}.{k}"] = v
            header["state_keys"][str(idx)] = keys
        tensors.update(self.rng.state())
        return {"tensors": tensors, "header": header}

    def load_state_dict(self, state: dict) -> None:
        header, tensors = state["header"], state["tensors"]
        if header.get("optimizer") != self.spec.optimizer:
            raise TrainingError(f"the saved optimizer state is for {header.get('optimizer')!r}, this run uses "
                                f"{self.spec.optimizer!r}; resume with the same optimizer")
        opt_state = {}
        scalars = header.get("state_scalars", {})
        for idx, keys in header["state_keys"].items():
            st = {k: tensors[f"opt.{idx}.{k}"] for k in keys}
            for name, v in scalars.items():
                i, _, k = name.partition(".")
                if i == idx:
                    st[k] = v
            opt_state[int(idx)] = st
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": header["param_groups"]})
        for group in self.optimizer.param_groups:  # the requested learning rate wins over the saved one
            group["lr"] = self.spec.learning_rate
        self.rng.load_state(tensors)
        self.step = int(header["step"])
