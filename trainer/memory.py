"""How much memory a training step needs, and the `memory` choice turned into settings.

The estimate is *measured*, not guessed from a table: before training, the run takes one
forward + backward step of each stage's own objective (with a throw-away generator, so the real run
is unchanged) at three small latent sizes (or at the training size when it is no larger), and reads the peak
memory it added (CUDA: max_memory_allocated; CPU: the process's peak RSS, reset through
/proc/self/clear_refs). A UNet step's memory grows with the latent area A as base + a·A + b·A²
(what does not depend on the image, such as merged LoRA weights; convolutions and projections,
linear in A; attention scores, where training keeps them, quadratic), so three sizes fix base, a
and b and the step at the training size is extrapolated (`fit_points`). Trainable parameters add their gradients and optimizer state (AdamW: two fp32 moments;
Adafactor: factored, about none).

`plan()` turns the estimate and the free memory (host.free_memory()) into settings:

* max_speed: no gradient checkpointing; precision as asked (auto: bf16 on a GPU that has it);
* low: gradient checkpointing, bf16 on a GPU, Adafactor for full deltas;
* auto: max_speed settings when the step fits in 80 % of the free memory, else checkpointing,
  else it refuses with the estimate, what is free, and the batch / resolution that would fit.

The same estimate is the memory guard: any mode refuses a run that cannot fit, before training.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import TrainingError

MODES = ("auto", "low", "max_speed")
FIT = 0.8  # share of the free memory a step may plan to use
PROBE_SIZES = (16, 24, 32)  # latent sides of the probes (128, 192 and 256 px for an 8x VAE)

GiB = 1024 ** 3


def fmt(n: float | None) -> str:
    if n is None:
        return "?"
    return f"{n / GiB:.2f} GiB" if n >= 0.1 * GiB else f"{n / 1024 ** 2:.0f} MiB"


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------

def _proc_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field_name}:\s+(\d+)", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def release_free_heap() -> None:
    """Hand freed heap memory back to the OS (glibc malloc_trim), so that a measurement's
    allocations show as RSS growth instead of silently reusing memory freed before it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_cpu_peak() -> bool:
    release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMeter:
    """Peak memory added while the `with` block runs (CUDA: allocator peak; CPU: peak RSS)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.added: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.ok = _reset_cpu_peak()
            self.base = _proc_kib("VmRSS") or 0
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.added = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.ok:
            self.added = max(0, (_proc_kib("VmHWM") or 0) - self.base)
        return False


def cpu_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"^MemAvailable:\s+(\d+)", f.read(), re.M)
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------------------------
# estimating
# ---------------------------------------------------------------------------------------------

@dataclass
class Estimate:
    """Extra memory of one training step at latent side h (weights already loaded):
    base + a·A + b·A² for the latent area A = h², plus the caller's `fixed`."""

    a: float  # bytes per latent pixel
    b: float  # bytes per latent pixel squared
    fixed: int  # memory that does not grow with the image (added by the caller)
    measured: dict[int, int] = field(default_factory=dict)  # latent side -> measured peak
    n_params: int = 0  # trainable values (their optimizer state is added per optimizer)
    base: float = 0.0  # what the step adds whatever the image size (merged weights, gradients, buffers)

    def at(self, side: int) -> int:
        if side in self.measured:
            return self.measured[side] + self.fixed
        area = side * side
        return int(self.base + self.a * area + self.b * area * area) + self.fixed

    def max_side(self, budget: float) -> int:
        """Largest latent side whose step fits in `budget` bytes (0 if none)."""
        room = budget - self.fixed - self.base
        if room <= 0:
            return 0
        if self.b <= 0:
            return int(math.sqrt(room / max(self.a, 1e-9)))
        area = (-self.a + math.sqrt(self.a * self.a + 4 * self.b * room)) / (2 * self.b)
        return int(math.sqrt(max(area, 0)))


def fit_points(points: dict[int, int], fixed: int = 0) -> Estimate:
    """base + a·A + b·A² through the measured (latent side -> peak bytes) points, all three >= 0.

    Why an intercept: at the probes' small sizes much of a step's memory does not grow with the
    image (a LoRA's merged layer weights and their gradients, optimizer-independent buffers); a fit
    without one charges that to the area and multiplies it by (training area / probe area) -- 8x too
    much for SDXL at 512^2 (measured: 23.6 GiB estimated, 3.0 GiB used). With three points the
    system is solved exactly; a negative b (noise, or no quadratic memory: memory-efficient
    attention) falls back to the least-squares line base + a·A, a negative base to a·A + b·A²."""
    sides = sorted(points)
    areas = [float(h * h) for h in sides]
    ms = [float(points[h]) for h in sides]
    base = a = b = 0.0
    if len(sides) >= 3:
        sol = torch.linalg.lstsq(torch.tensor([[1.0, A, A * A] for A in areas], dtype=torch.float64),
                                 torch.tensor(ms, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1).tolist()
        base, a, b = sol
    if len(sides) < 3 or b < 0 or a < 0:  # line with an intercept (least squares)
        n = len(areas)
        mean_a, mean_m = sum(areas) / n, sum(ms) / n
        var = sum((x - mean_a) ** 2 for x in areas)
        a = sum((x - mean_a) * (y - mean_m) for x, y in zip(areas, ms)) / var if var > 0 else 0.0
        base, b = mean_m - a * mean_a, 0.0
        if a < 0:  # memory that shrinks with the image: noise; take the largest measurement as flat
            base, a = max(ms), 0.0
    if base < 0:  # through the origin: a·A + b·A² (least squares)
        base = 0.0
        X = torch.tensor([[A, A * A] for A in areas], dtype=torch.float64)
        a, b = torch.linalg.lstsq(X, torch.tensor(ms, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1).tolist()
        if b < 0:
            a, b = max(m / A for m, A in zip(ms, areas)), 0.0
    return Estimate(a=max(a, 0.0), b=max(b, 0.0), fixed=fixed, base=base)


def fit(measure: Callable[[int], int | None], side: int, fixed: int) -> Estimate | None:
    """Estimate from `measure(latent_side) -> peak bytes` at the probe sizes (or at `side` itself
    when it is no larger than the largest probe). None when memory cannot be measured here."""
    if side <= PROBE_SIZES[-1]:
        m = measure(side)
        if m is None:
            return None
        area = side * side
        return Estimate(a=m / area, b=0.0, fixed=fixed, measured={side: m})
    points = {}
    for s in PROBE_SIZES:
        m = measure(s)
        if m is None:
            return None
        points[s] = m
    est = fit_points(points, fixed)
    est.measured = dict(points)
    return est


def optimizer_bytes(n_params: int, optimizer: str) -> int:
    """Optimizer state of n trainable fp32 values (their gradients are part of the measured step)."""
    if optimizer == "adafactor":
        return int(0.05 * 4 * n_params)  # factored second moments: a row and a column vector per matrix
    return 8 * n_params  # AdamW: two fp32 moments


# ---------------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------------

@dataclass
class Plan:
    device: str
    dtype: torch.dtype
    checkpointing: bool
    optimizer: str
    sync_every: int
    estimate_bytes: int | None = None
    available_bytes: int | None = None
    reasons: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        dt = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        line = (f"{self.device}, {dt} compute, gradient checkpointing {'on' if self.checkpointing else 'off'}, "
                f"optimizer {self.optimizer}")
        if self.estimate_bytes is not None:
            line += f"; step needs ~{fmt(self.estimate_bytes)} of {fmt(self.available_bytes)} free"
        return [line] + self.reasons


def compute_dtype(precision: str, device: str) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def choose(opts, *, device: str, full: bool, estimate: Callable[[bool, str], int | None], available: int | None,
           side: int, batch: int, scale: int = 8) -> Plan:
    """Settings for opts.memory from estimate(checkpointing, optimizer) -> bytes and the free memory.
    Raises TrainingError when nothing fits."""
    cpu = torch.device(device).type == "cpu"
    dtype = compute_dtype(opts.precision if opts.memory != "low" or opts.precision != "auto" else "auto", device)
    optimizer = opts.optimizer
    if optimizer == "auto":
        optimizer = "adafactor" if (opts.memory == "low" and full) else "adamw"
    reasons = [f"memory={opts.memory}"]

    def fits(n):
        return n is None or available is None or n <= FIT * available

    if opts.memory == "max_speed":
        checkpointing = False
    elif opts.memory == "low":
        checkpointing = True
    else:
        checkpointing = not fits(estimate(False, optimizer))
        if checkpointing:
            reasons.append("without gradient checkpointing the step would not fit; checkpointing is on")
    need = estimate(checkpointing, optimizer)
    if opts.memory == "auto" and not fits(need) and full and optimizer == "adamw" and opts.optimizer == "auto":
        optimizer = "adafactor"
        reasons.append("AdamW's moments of a full delta would not fit; using Adafactor")
        need = estimate(checkpointing, optimizer)
    if not fits(need):
        raise TrainingError(memory_refusal(need, available, side, batch, scale, estimate, checkpointing, optimizer,
                                           opts.memory, torch.device(device).type))
    return Plan(device=str(device), dtype=dtype, checkpointing=checkpointing, optimizer=optimizer,
                sync_every=1 if cpu else 10, estimate_bytes=need, available_bytes=available, reasons=reasons)


def memory_refusal(need, available, side, batch, scale, estimate_fn, checkpointing, optimizer, mode,
                   device_type: str = "cpu") -> str:
    est = getattr(estimate_fn, "last", None)
    advice = []
    if est is not None:
        budget = FIT * available
        per_item = max(1, (est.at(side) - est.fixed))
        fit_batch = int((budget - est.fixed) // (per_item / max(batch, 1))) if budget > est.fixed else 0
        if 1 <= fit_batch < batch:
            advice.append(f"batch_size {fit_batch}")
        max_side = est.max_side(budget)
        res = (max_side * scale) // 64 * 64
        if 64 <= res < side * scale:
            advice.append(f"resolution {res}")
    if mode != "low" and not checkpointing:
        advice.append("memory=low (gradient checkpointing)")
    where = "this machine's RAM" if device_type == "cpu" else "the GPU"
    msg = (f"this training step needs about {fmt(need)} but only {fmt(available)} is free in {where} "
           f"({'with' if checkpointing else 'without'} gradient checkpointing, {optimizer})")
    if advice:
        msg += "; settings that would fit: " + " or ".join(advice)
    else:
        msg += "; use a smaller resolution or batch, or a device with more memory"
    return msg


def device_of(host) -> str:
    return str(getattr(host, "device", "cpu"))


def env_available_override() -> int | None:
    """DOMAINSTUDIO_MEMORY_BYTES: pretend this much is free (tests, or a shared server's owner
    capping what a run may take)."""
    v = os.environ.get("DOMAINSTUDIO_MEMORY_BYTES")
    return int(float(v)) if v else None
