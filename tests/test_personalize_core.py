"""trainer/personalize.py without any host: config validation, prompts, and the stage loop on a toy
prompt-conditioned denoiser."""

import math

import pytest
import torch

from toy_backend import sd_sigmas
from trainer.domainstudio import TrainingError
from trainer.personalize import (DEFAULT_INIT_WORD, METHODS, PersonalizeConfig, denoising_stage_loss, train_stage,
                                 trains_unet, uses_token)


class ToyPromptBackend:
    """x0-prediction denoiser over [N, 4, 8, 8]: x0 = conv1x1(x_in; W + dW) + cond, where cond is
    the sum of per-word vectors of the prompt and the word 'tok' maps to the trainable `token`."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(4, 4, generator=g) * 0.1  # frozen
        self.dw = torch.nn.Parameter(torch.zeros(4, 4))  # "UNet" delta
        self.token = torch.nn.Parameter(torch.zeros(4))  # learned token vector
        self.words = {}
        self.g = g
        self.sigmas = sd_sigmas()
        self.encoded = []

    def sample_sigmas(self, n, generator):
        return self.sigmas[torch.randint(0, 1000, (n,), generator=generator)]

    def add_noise(self, x0, noise, sigma):
        return x0 + noise * sigma.view(-1, 1, 1, 1)

    def encode(self, prompt):
        self.encoded.append(prompt)
        vec = torch.zeros(4)
        for w in prompt.split():
            vec = vec + (self.token if w == "tok" else self.words.setdefault(w, torch.randn(4, generator=self.g) * 0.1))
        return vec

    def predict_x0(self, xt, sigma, cond):
        s = sigma.view(-1, 1, 1, 1)
        x_in = xt / (s**2 + 1).sqrt()
        return torch.einsum("oc,nchw->nohw", self.w + self.dw, x_in) + cond.view(1, -1, 1, 1)

    def denoising_loss(self, pred, x0, sigma):
        return ((pred - x0) ** 2).mean()


def _data(n=3):
    return torch.tensor([0.8, -0.5, 0.3, 0.1]).view(1, 4, 1, 1).expand(n, 4, 8, 8).clone()


def _fixed_batch_loss(backend, x0, prompt, draws=16):
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return sum(float(denoising_stage_loss(backend, x0, backend.encode(prompt), gen)) for _ in range(draws)) / draws


def test_token_stage_trains_only_the_token_and_lowers_the_loss():
    b = ToyPromptBackend()
    x0 = _data()
    before = _fixed_batch_loss(b, x0, "a photo of tok dog")
    w0 = b.w.clone()
    r = train_stage(b, x0, [b.token], name="token", steps=150, learning_rate=0.05,
                    prompts=["a photo of tok dog", "a rendering of tok dog"], batch_size=2)
    after = _fixed_batch_loss(b, x0, "a photo of tok dog")
    assert after < 0.5 * before, (before, after)
    assert b.token.abs().sum() > 0 and torch.equal(b.dw, torch.zeros(4, 4)) and torch.equal(b.w, w0)
    assert r.steps_done == 150 and len(r.history["loss"]) == 150 and r.seconds > 0
    assert {"a photo of tok dog", "a rendering of tok dog"} <= set(b.encoded), "templates are sampled"


def test_unet_stage_with_prior_adds_the_class_term():
    b = ToyPromptBackend()
    grads = []
    r = train_stage(b, _data(), [b.dw], name="unet", steps=3, learning_rate=1e-2, prompts=["a photo of sks dog"],
                    prior_x0=torch.zeros(4, 4, 8, 8), prior_prompt="a photo of dog", lambda_prior=1.0,
                    on_step=lambda n, s, loss: grads.append(b.dw.grad.abs().sum().item()))
    assert all(p > 0 for p in r.history["prior"]) and all(g > 0 for g in grads)
    assert "a photo of dog" in b.encoded
    assert b.token.grad is None  # not trained, not even touched
    r0 = train_stage(ToyPromptBackend(), _data(), [ToyPromptBackend().dw], name="unet", steps=2, learning_rate=1e-2,
                     prompts=["x"], prior_x0=torch.zeros(4, 4, 8, 8), lambda_prior=0.0)
    assert r0.history["prior"] == [0.0, 0.0]


def test_same_seed_same_result():
    def run():
        b = ToyPromptBackend()
        train_stage(b, _data(), [b.token, b.dw], name="s", steps=5, learning_rate=1e-2, prompts=["tok a", "tok b"], seed=7)
        return b.token.detach().clone(), b.dw.detach().clone()

    (t1, d1), (t2, d2) = run(), run()
    assert torch.equal(t1, t2) and torch.equal(d1, d2)


def test_non_finite_loss_stops_with_the_step_and_a_fix():
    b = ToyPromptBackend()
    with torch.no_grad():
        b.token.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"step 1.*Lower the learning rate"):
        train_stage(b, _data(), [b.token], name="token", steps=3, learning_rate=1.0, prompts=["tok"])


def test_prompts_per_method():
    rare = PersonalizeConfig(method="rare_token", class_noun="backpack", trigger="zwx")
    assert rare.instance_prompt() == "a photo of zwx backpack"
    assert all("zwx backpack" in p for p in rare.stage1_prompts()) and len(set(rare.stage1_prompts())) > 4
    ti = PersonalizeConfig(method="textual_inversion", class_noun="backpack", trigger="zwx")
    assert ti.instance_prompt() == "a photo of zwx"
    db = PersonalizeConfig(method="dreambooth", class_noun="backpack", trigger="sks")
    assert db.instance_prompt() == "a photo of sks backpack" and db.class_prompt() == "a photo of backpack"
    assert [m for m in METHODS if uses_token(m)] == ["rare_token", "textual_inversion"]
    assert [m for m in METHODS if not trains_unet(m)] == ["textual_inversion"]
    assert PersonalizeConfig().init_word == DEFAULT_INIT_WORD


@pytest.mark.parametrize("kw, n, match", [
    (dict(method="lora"), 3, "method"),
    (dict(ti_learning_rate=math.nan), 3, "ti_learning_rate"),
    (dict(unet_learning_rate=-1.0), 3, "unet_learning_rate"),
    (dict(lambda_prior=math.inf), 3, "lambda_prior"),
    (dict(num_vectors=0), 3, "num_vectors"),
    (dict(batch_size=4), 3, "batch_size"),
    (dict(trigger="two words"), 3, "trigger_word"),
    (dict(trigger="embeddingfoo"), 3, "embedding"),
    (dict(trigger=" "), 3, "trigger_word"),
    (dict(method="dreambooth", class_noun=""), 3, "class_noun"),
    (dict(method="rare_token", class_noun=""), 3, "class_noun"),
    (dict(), 0, "no training images"),
])
def test_validate_names_the_setting(kw, n, match):
    with pytest.raises(TrainingError, match=match):
        PersonalizeConfig(**kw).validate(n)


def test_dreambooth_without_prior_needs_no_class_noun_and_one_image_warns():
    assert PersonalizeConfig(method="dreambooth_no_prior", class_noun="", trigger="sks").validate(3) == []
    assert "1 training image" in PersonalizeConfig(batch_size=1).validate(1)[0]
