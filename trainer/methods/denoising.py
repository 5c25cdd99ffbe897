"""The plain denoising objective, shared by every method that is not DomainStudio: the host's
native loss of the model on noised training latents, conditioned on a prompt, plus DreamBooth's
prior-preservation term on class images when asked."""

from __future__ import annotations

import torch

from ..loop import Rng
from .base import StageInputs, batch_indices, noised


class DenoisingObjective:
    """instance loss (+ lambda_prior * prior loss).

    prompts: `per_step` draws one of `prompts` per step (textual inversion's templates, or one
    instance prompt); `per_image` conditions each image on its own prompt (captions)."""

    terms = ("instance", "prior")

    def __init__(self, inputs: StageInputs, prompts: list[str], batch_size: int, *, per_image: bool = False,
                 lambda_prior: float = 0.0, prior_prompt: str = ""):
        self.inputs, self.prompts, self.batch_size, self.per_image = inputs, list(prompts), batch_size, per_image
        self.use_prior = inputs.prior_x0 is not None and inputs.prior_x0.shape[0] > 0 and lambda_prior > 0
        self.lambda_prior, self.prior_prompt = lambda_prior, prior_prompt
        self.conds = [inputs.encode(p) for p in self.prompts] if per_image else None

    def _loss(self, x0: torch.Tensor, cond, rng: Rng) -> torch.Tensor:
        host = self.inputs.host
        xt, sigma = noised(host, x0, rng, self.inputs.timesteps)
        return host.denoising_loss(host.predict_x0(xt, sigma, cond), x0, sigma)

    def __call__(self, rng: Rng):
        inp, host = self.inputs, self.inputs.host
        idx = batch_indices(inp.x0.shape[0], self.batch_size, rng)
        if self.per_image:
            cond = host.stack_conds([self.conds[i] for i in idx.tolist()])
        else:
            prompt = self.prompts[int(torch.randint(len(self.prompts), (1,), generator=rng.cpu))]
            cond = inp.encode(prompt)
        instance = self._loss(inp.x0[idx], cond, rng)
        total, prior = instance, torch.zeros((), device=instance.device)
        if self.use_prior:
            pidx = batch_indices(inp.prior_x0.shape[0], self.batch_size, rng)
            prior = self._loss(inp.prior_x0[pidx], inp.encode(self.prior_prompt), rng)
            total = total + self.lambda_prior * prior
        return total, {"instance": instance, "prior": prior}
