"""The diffusers host (trainer/hosts/diffusers.py): DiffusersHost + the core's run() over diffusers
models with no ComfyUI import, on the diffusers twin of the tiny SD1.5 checkpoint
(testing/diffusers_twin.py) with a tiny AutoencoderTiny (8x downsampling, so 64x64 images are 8x8
latents).

Checked against the real ComfyUI: the sigma schedule and x0 prediction equal ComfyUI's model
sampling of the same checkpoint; the layers trained equal ComfyUI host's selection; the saved LoRA
(kohya names of diffusers paths) loads through the stock LoRA path with no key left over and gives
the same UNet as the diffusers host, and diffusers' own load_lora_weights reads it too; the sampler
is ComfyUI's KSampler (euler / normal). The CLI `python -m dstrain --host diffusers` runs in a
subprocess that never imports comfy."""

import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_domainstudio.testing.harness import REPO, comfy_dir
from comfyui_domainstudio.trainer import deltas, embeddings, losses
from comfyui_domainstudio.trainer.hosts import diffusers as dh
from comfyui_domainstudio.trainer.run import RunOptions, resolve_config, run

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("unload_models")]

torch.set_num_threads(1)
TOL = 1e-4  # relative, fp32 on both sides


def tiny_vae():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    return AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4)


@pytest.fixture(scope="module")
def twin(comfy, tiny_models):
    from comfyui_domainstudio.testing import tiny_models as tm
    from comfyui_domainstudio.testing.diffusers_twin import build_sd15_twin

    pipe = build_sd15_twin(tiny_models["sd15"], comfy.root, tm.sd15_unet_config())
    pipe.register_modules(vae=tiny_vae())
    return pipe


@pytest.fixture(scope="module")
def models(twin):
    for m in (twin.unet, twin.text_encoder, twin.vae):
        m.requires_grad_(False).eval()
    return dh.DiffusersModels(twin.unet, twin.text_encoder, twin.tokenizer, twin.vae,
                              dh.Schedule(twin.scheduler.config))


@pytest.fixture()
def host(models):
    """A DiffusersHost over the shared models; whatever a test leaves attached or spliced is undone."""
    h = dh.DiffusersHost(models)
    tokenizer, embedding = models.tokenizer, models.text_encoder.get_input_embeddings()
    yield h
    h.release()
    assert models.tokenizer is tokenizer and models.text_encoder.get_input_embeddings() is embedding
    assert not [n for n, m in models.unet.named_modules() if "forward" in m.__dict__], "a delta is still attached"


def _images(n=4, res=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(res), torch.arange(res), indexing="ij")
    out = []
    for _ in range(n):
        phase = torch.rand(1, generator=g) * 6.28
        stripes = 0.5 + 0.5 * torch.sin((xx + yy) / 4.0 + phase)
        out.append(stripes[..., None] * (torch.rand(3, generator=g) * 0.6 + 0.2))
    return torch.stack(out).float()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.3, 6.0]), torch.randn(1, 77, 768, generator=g)


def _x0(host, adapted=True, cond=None, seed=1):
    x, sigma, ctx = _inputs(seed)
    with torch.no_grad():
        return host.predict_x0(x, sigma, ctx if cond is None else cond, adapted)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _opts(**kw):
    return RunOptions(**{**dict(train_mode="lora_all", lora_rank=4, lora_alpha=4.0, precision="fp32"), **kw})


def test_schedule_and_x0_match_comfy_model_sampling(sd15, models, host):
    model = sd15[0]
    ms = model.model.model_sampling
    s = models.schedule
    assert torch.allclose(s.sigmas, ms.sigmas.float(), rtol=1e-5)
    u = torch.tensor([0.001, 0.1, 0.37, 0.5, 0.93, 0.999])
    ours = s.percent_to_sigma(u)
    theirs = torch.tensor([float(ms.percent_to_sigma(float(p))) for p in u])
    assert torch.allclose(ours, theirs, rtol=1e-5)
    assert torch.equal(s.timestep(ours), ms.timestep(theirs).long())
    # Training sigmas: uniform in timestep through the same mapping.
    g = torch.Generator().manual_seed(3)
    drawn = host.sample_sigmas(64, g)
    assert torch.allclose(drawn, s.percent_to_sigma(torch.rand(64, generator=torch.Generator().manual_seed(3))
                                                    .clamp(max=0.999)))
    # min_timestep / max_timestep: noise levels at fractional timesteps, as ComfyUI's schedule gives them
    t = torch.tensor([0.0, 1.0, 250.25, 499.5, 999.0])
    assert torch.allclose(host.sigma_at(t), ms.sigma(t).float(), rtol=1e-5)
    # x0 prediction (eps model) of the host equals ComfyUI's own denoised output on the same x_t.
    x, sigma, ctx = _inputs()
    from comfy import model_management

    model_management.load_models_gpu([model])
    with torch.no_grad():
        ref = model.model.apply_model(x, sigma, c_crossattn=ctx.expand(2, -1, -1)).float()
    got = _x0(host)
    err = (got - ref).abs().max().item()
    assert err <= TOL * max(1.0, ref.abs().max().item()), err
    # add_noise is ComfyUI's noise scaling for eps/v models (x0 + sigma * noise).
    noise = torch.randn_like(x)
    assert torch.allclose(host.add_noise(x, noise, sigma), ms.noise_scaling(sigma, noise, x), atol=1e-6)


def test_v_prediction_conversion(models):
    """x0 from v (DDPM: v = sqrt(a) eps - sqrt(1-a) x0, x_ddpm = sqrt(a) x0 + sqrt(1-a) eps) in sigma
    space, and the loss in v parameterisation."""
    sched = dh.Schedule({"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                         "prediction_type": "v_prediction"})
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([10, 500, 990])
    a = (1 / (1 + sched.sigmas[t].double() ** 2)).view(-1, 1, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0.double()
    sigma = sched.sigmas[t]

    class FakeUnet(torch.nn.Module):
        dtype = torch.float32
        config = type("C", (), {"cross_attention_dim": 768, "in_channels": 4, "addition_embed_type": None,
                                "sample_size": 8})()

        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # device for the host

        def forward(self, x_in, tt, encoder_hidden_states):
            assert torch.equal(tt, t)
            assert torch.allclose(x_in.double(), a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-4)
            return type("O", (), {"sample": v.float()})()

    fake = dh.DiffusersModels(FakeUnet(), models.text_encoder, models.tokenizer, models.vae, sched)
    host = dh.DiffusersHost(fake)
    xt = host.add_noise(x0, eps, sigma)
    pred = host.predict_x0(xt, sigma, torch.zeros(1, 1, 1), True)
    assert torch.allclose(pred, x0, atol=1e-4)
    wrong = x0 + 0.1
    assert torch.equal(host.denoising_loss(wrong, x0, sigma), losses.denoising_loss_x0(wrong, x0, sigma, "v", 1.0))
    assert not torch.allclose(host.denoising_loss(wrong, x0, sigma), losses.denoising_loss_x0(wrong, x0, sigma, "eps",
                                                                                                1.0))


def test_modes_select_comfy_hosts_layers(comfy, sd15, models):
    """Each train mode touches the same weights as trainer/hosts/comfy.py on the ComfyUI model."""
    from comfy import utils as comfy_utils

    from comfyui_domainstudio.testing import tiny_models as tm

    key_map = comfy_utils.unet_to_diffusers(tm.sd15_unet_config())  # diffusers key -> ldm key
    dm = sd15[0].model.diffusion_model
    chost = comfy.pack("trainer.hosts.comfy")
    for mode in ("lora_attn", "lora_all", "full_attn", "full_all"):
        ours = {key_map[n + ".weight"] for n in dh.trainable_module_names(models.unet, mode)}
        theirs = {n + ".weight" for n in chost.trainable_module_names(dm, mode)}
        assert ours == theirs, (mode, sorted(ours ^ theirs)[:5])


@pytest.mark.parametrize("mode", ["lora_all", "full_attn"])
def test_switch_off_is_the_source_and_grads_reach_only_deltas(models, host, mode):
    ref = _x0(host)
    before = _state(models.unet)
    adapter = host.attach(mode, 4, 2.0, 0)
    n_layers = len(dh.trainable_module_names(models.unet, mode))
    assert len(adapter.deltas) == n_layers and len(adapter.layers()) == n_layers
    with torch.no_grad():  # make every factor matter (LoRA up starts at zero)
        for p in adapter.parameters():
            p.normal_(0, 0.02)
    assert torch.equal(_x0(host, adapted=False), ref), "switch off must be the source, bitwise"
    x, sigma, ctx = _inputs()
    with torch.enable_grad():
        host.denoising_loss(host.predict_x0(x, sigma, ctx, True), torch.zeros_like(x), sigma).backward()
    trainable = {id(p) for p in adapter.parameters()}
    assert len(trainable) == (2 if mode.startswith("lora") else 1) * n_layers
    for p in adapter.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    others = [n for n, p in models.unet.named_parameters() if p.grad is not None or p.requires_grad]
    assert others == []
    adapted = _x0(host, adapted=True)
    assert (adapted - ref).abs().max() > 1e-4
    # The adapter's state is its kohya-named delta; loading it into a fresh attach reproduces it.
    state = adapter.state_dict()
    host.release()
    assert torch.equal(_x0(host), ref) and _same_state(_state(models.unet), before)
    again = host.attach(mode, 4, 2.0, 1)
    assert again.load_state_dict(state) == []
    assert torch.equal(_x0(host), adapted)


@pytest.fixture(scope="module")
def trained(models):
    """lora_all r4, 20 DomainStudio steps (batch 3) through run(): the loss on fixed (noise, sigma)
    draws before and after, the adapter's state (the saved file's values) and the exact delta."""
    host = dh.DiffusersHost(models)
    images = _images(4)
    unet_before, te_before = _state(models.unet), _state(models.text_encoder)
    with torch.no_grad():
        x0 = host.encode_images(images)
    g = torch.Generator().manual_seed(123)
    draws = [(torch.randn(x0.shape, generator=g), torch.rand(4, generator=g).clamp(max=0.999)) for _ in range(6)]

    def fixed_loss(adapted):
        cond = host.encode_prompt("")
        total = 0.0
        with torch.no_grad():
            for noise, u in draws:
                sigma = models.schedule.percent_to_sigma(u)
                pred = host.predict_x0(host.add_noise(x0, noise, sigma), sigma, cond, adapted)
                total += float(host.denoising_loss(pred, x0, sigma))
        return total / len(draws)

    with torch.no_grad():
        base_loss = fixed_loss(True)
    cfg = resolve_config("domainstudio", dict(steps=20, learning_rate=2e-3, batch_size=3))
    with torch.inference_mode():  # run() leaves it, as under a ComfyUI node
        out = run(host, "domainstudio", cfg, images, _opts())
    try:
        result = dict(out=out, base_loss=base_loss, after_loss=fixed_loss(True), off_loss=fixed_loss(False),
                      unet_before=unet_before, te_before=te_before, adapter_state=out.adapter.state_dict(),
                      n_layers=len(out.adapter.deltas))
    finally:
        host.release()  # tests that need it attached attach a fresh adapter and load adapter_state
    return result


def test_training_lowers_loss_and_keeps_source_weights(models, trained):
    out = trained["out"]
    (stage,) = out.stages
    print(f"fixed-draw loss: source {trained['base_loss']:.4f} -> adapted {trained['after_loss']:.4f}; "
          f"{stage.steps_done} steps in {stage.seconds:.1f} s")
    assert stage.steps_done == 20 and len(stage.history["total"]) == 20
    assert trained["after_loss"] < 0.9 * trained["base_loss"]
    assert trained["off_loss"] == trained["base_loss"], "switch off after training is still the source"
    assert _same_state(_state(models.unet), trained["unet_before"]), "UNet weights bit-identical"
    assert _same_state(_state(models.text_encoder), trained["te_before"])
    delta = out.delta
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha"))
               for k in delta)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in delta
    assert delta["lora_unet_conv_in.lora_down.weight"].ndim == 4
    assert out.family == "sd1" and out.fingerprint == dh.fingerprint(models.unet)


class LoraWarnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        msg = record.getMessage()
        if any(w in msg for w in ("lora key not loaded", "NOT LOADED", "unexpected keys", "missing keys", "incompatible")):
            self.messages.append(msg[:300])

    def __enter__(self):
        for name in ("", "diffusers", "peft"):
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in ("", "diffusers", "peft"):
            logging.getLogger(name).removeHandler(self)


def _rel_close(a, b, what):
    err = (a - b).abs().max().item()
    scale = a.abs().max().item()
    print(f"{what}: max abs diff {err:.3g} (scale {scale:.3g})")
    assert err <= TOL * max(1.0, scale), what


def test_saved_lora_loads_in_comfy_and_diffusers_with_the_same_unet(comfy, sd15, twin, models, trained, tmp_path):
    from comfy import model_management, sd

    comfy_files = comfy.pack("trainer.hosts.comfy_files")
    model = sd15[0]
    out = trained["out"]
    meta = deltas.build_metadata(kind="lora", family="sd1", title="dhost", method="domainstudio", rank=4, alpha=4.0)
    path = deltas.save_delta(deltas.unique_path(str(tmp_path), "dhost"), out.delta, meta, dtype="fp16")
    tensors, md = deltas.read_weight_file(path)
    assert md["domainstudio.kind"] == "lora" and md["ss_network_dim"] == "4"
    for k, v in trained["adapter_state"].items():  # the trained model holds exactly the file's values
        assert torch.equal(tensors[k].float(), v.float()), k
    assert comfy_files.check_delta(model, None, tensors) == ([], [])
    with LoraWarnings() as w:
        patched, _ = sd.load_lora_for_models(model, None, tensors, 1.0, 0.0)
    assert w.messages == [], w.messages[:3]
    assert len(patched.patches) == len({k.split(".")[0] for k in tensors}) == trained["n_layers"]
    # One UNet forward on the same input: ComfyUI's stock-patched model vs the diffusers host.
    x, sigma, ctx = _inputs()
    t = models.schedule.timestep(sigma).float()
    model_management.load_models_gpu([patched])
    with torch.no_grad():
        theirs = patched.model.diffusion_model(x, t, context=ctx.expand(2, -1, -1)).float()
    model_management.unload_all_models()
    with torch.no_grad():
        base = model.model.diffusion_model(x, t, context=ctx.expand(2, -1, -1)).float()
    host = dh.DiffusersHost(models)
    try:
        assert host.attach("lora_all", 4, 4.0, 0).load_state_dict(tensors) == []
        with torch.no_grad():
            ours = models.unet(x, t, encoder_hidden_states=ctx.expand(2, -1, -1)).sample.float()
    finally:
        host.release()
    assert (ours - base).abs().max() > 1e-3, "the trained LoRA changes the UNet"
    _rel_close(theirs, ours, "ComfyUI stock LoRA vs diffusers host")
    # diffusers' own loader reads the diffusers-path kohya names natively (no unet_config).
    try:
        with LoraWarnings() as w:
            twin.load_lora_weights(path, adapter_name="dhost")
        assert w.messages == [], w.messages[:3]
        with torch.no_grad():
            got = twin.unet(x, t, encoder_hidden_states=ctx.expand(2, -1, -1)).sample.float()
        assert (got - base).abs().max() > 1e-3, "diffusers applied the LoRA"
        _rel_close(got, ours, "diffusers load_lora_weights vs diffusers host")
    finally:
        twin.unload_lora_weights()


def test_full_delta_file_loads_in_comfy(comfy, sd15, host, tmp_path):
    from comfy import sd

    cfg = resolve_config("domainstudio", dict(steps=2, learning_rate=1e-3, batch_size=3))
    out = run(host, "domainstudio", cfg, _images(4), _opts(train_mode="full_attn"))
    assert all(k.endswith(".diff") for k in out.delta) and any(v.abs().max() > 0 for v in out.delta.values())
    path = deltas.save_delta(os.path.join(str(tmp_path), "full.safetensors"), out.delta,
                             deltas.build_metadata(kind="diff", family="sd1", title="full", method="domainstudio"))
    tensors, _ = deltas.read_weight_file(path)
    assert comfy.pack("trainer.hosts.comfy_files").check_delta(sd15[0], None, tensors) == ([], [])
    patched, _ = sd.load_lora_for_models(sd15[0], None, tensors, 1.0, 0.0)
    assert len(patched.patches) == len(tensors)


# --- the CLI, in a subprocess that must not import ComfyUI ------------------------------------

_RUNNER = r"""
import json, runpy, sys
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("comfy", "comfy_api", "comfy_extras", "folder_paths", "comfyui_version"):
            seen.append(name)
        return None
sys.meta_path.insert(0, Watch())
report, sys.argv = sys.argv[1], ["dstrain"] + sys.argv[2:]
code = 0
try:
    runpy.run_module("dstrain", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if not isinstance(e.code, int) and e.code is not None:
        print(e.code, file=sys.stderr)
mods = sorted(m for m in sys.modules if m.split(".")[0] in ("comfy", "comfy_api", "comfy_extras", "folder_paths"))
json.dump({"attempted": seen, "imported": mods}, open(report, "w"))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def cli_inputs(twin, tmp_path_factory):
    """A diffusers folder saved with save_pretrained from the twin, and a folder of 4 tiny PNGs."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tmp = tmp_path_factory.mktemp("dhost_cli")
    # A diffusers config cannot state the tiny checkpoint's depth-0 middle transformer, so the folder
    # gets a complete UNet: the twin's weights plus a seeded middle transformer block.
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**twin.unet.config)
    missing, unexpected = unet.load_state_dict(twin.unet.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("mid_block.attentions.0.transformer_blocks.0.") for k in missing)
    folder = tmp / "twin"
    StableDiffusionPipeline(**{**twin.components, "unet": unet}).save_pretrained(str(folder))
    images = tmp / "images"
    images.mkdir()
    for i, img in enumerate(_images(4, seed=3)):
        Image.fromarray((img.numpy() * 255).round().astype(np.uint8)).save(images / f"s{i}.png")
    # ComfyUI is importable in the child (PYTHONPATH): the runner sees it if anything imports it.
    env = {**os.environ, "COMFYUI_DIR": comfy_dir(), "PYTHONPATH": comfy_dir(), "OMP_NUM_THREADS": "1"}
    return str(folder), str(images), env


def _run_cli(cli_inputs, tmp_path, *args):
    folder, images, env = cli_inputs
    out = tmp_path / "out"
    report = tmp_path / "modules.json"
    argv = ["--host", "diffusers", "--diffusers", folder, "--images", images, "--resolution", "64", "--out", str(out),
            *args]
    r = subprocess.run([sys.executable, "-c", _RUNNER, str(report), *argv], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(report.read_text()) == {"attempted": [], "imported": []}, "ComfyUI was imported"
    run = json.loads((out / "run.json").read_text())
    assert run["host"] == "diffusers" and run["family"] == "sd1" and run["images"] == 4
    for g in run["grids"]:
        im = Image.open(out / g)
        assert im.size[0] == int(args[args.index("--samples") + 1]) * 64 and im.size[1] in (64, 128)
    return run


def test_cli_diffusers_host_trains_without_comfy(cli_inputs, tmp_path):
    run = _run_cli(cli_inputs, tmp_path, "--steps", "3", "--batch-size", "3", "--train-mode", "lora_attn",
                   "--target-prompt", "a sks house", "--source-prompt", "a house", "--samples", "2",
                   "--sample-steps", "2")
    (lora,) = run["files"]
    assert os.path.basename(lora) == "domainstudio_00001.safetensors"
    tensors, md = deltas.read_weight_file(lora)
    assert md["domainstudio.family"] == "sd1" and md["modelspec.trigger_phrase"] == "a sks house"
    assert json.loads(md["domainstudio.training"])["host"] == "diffusers"
    assert md["domainstudio.base_fingerprint"].startswith("ds1-")
    assert all(k.startswith(("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn",
                             "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn",
                             "lora_unet_up_blocks_0_attentions_")) for k in tensors)
    assert len(tensors) == 4 * 4 * 2 * 3  # 4 transformer blocks (down, mid, 2 up) x 4 leaves x attn1/2 x 3
    # --host diffusers without --diffusers: a clear message, no traceback.
    _, images, env = cli_inputs
    r = subprocess.run([sys.executable, "-m", "dstrain", "--host", "diffusers", "--images", images], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--host diffusers" in r.stderr and "Traceback" not in r.stderr


def test_cli_diffusers_host_rare_token(cli_inputs, tmp_path):
    run = _run_cli(cli_inputs, tmp_path, "--method", "rare_token", "--ti-steps", "2", "--unet-steps", "2",
                   "--class-noun", "dog", "--samples", "1", "--sample-steps", "2")
    names = sorted(os.path.basename(f) for f in run["files"])
    assert names == ["ds_subject.safetensors", "rare_token_00001.safetensors"]
    vectors, md = embeddings.read_embedding(next(f for f in run["files"] if f.endswith("ds_subject.safetensors")))
    assert vectors["clip_l"].shape == (1, 768) and md["domainstudio.method"] == "rare_token"


def test_ldm_names_and_fingerprint_match_comfy(comfy, sd15, models, host):
    """diffusers -> ldm UNet names are the inverse of ComfyUI's map (on a 2-level UNet with
    down/up samplers and attention on one level only, and on the twin), and the base fingerprint
    written into files equals the ComfyUI host's for the same checkpoint."""
    from comfy import utils as comfy_utils
    from diffusers import UNet2DConditionModel

    from comfyui_domainstudio.testing import tiny_models as tm

    unet = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2,
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, sample_size=8)
    ldm_cfg = {"num_res_blocks": [2, 2], "channel_mult": [1, 2], "transformer_depth": [1, 1, 0, 0],
               "transformer_depth_output": [1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1}
    key_map = comfy_utils.unet_to_diffusers(ldm_cfg)
    keys = list(unet.state_dict())
    assert {k: dh.ldm_unet_key(k, 2) for k in keys if "upsamplers" not in k} == \
        {k: key_map[k] for k in keys if "upsamplers" not in k}
    assert {k: v for k, v in zip(keys, dh.ldm_unet_state(unet)) if "upsamplers" in k} == \
        {k: key_map[k] for k in keys if "upsamplers" in k}
    key_map = comfy_utils.unet_to_diffusers(tm.sd15_unet_config())
    assert list(dh.ldm_unet_state(models.unet)) == [key_map[k] for k in models.unet.state_dict()]
    chost = comfy.pack("trainer.hosts.comfy")
    assert dh.fingerprint(models.unet) == chost.fingerprint(sd15[0]) == host.fingerprint()


def test_rare_token_trains_only_the_new_row_and_loads_in_diffusers(twin, models, host, tmp_path):
    te_before = _state(models.text_encoder)
    tokenizer = models.tokenizer
    plain = models.encode_prompt("a photo of a dog")
    cfg = resolve_config("rare_token", dict(class_noun="dog", new_token="dspers", ti_steps=4, unet_steps=2,
                                            ti_learning_rate=5e-2, unet_learning_rate=1e-2, batch_size=2))
    quaint = models.text_encoder.get_input_embeddings().weight[tokenizer("quaint", add_special_tokens=False).input_ids[0]]
    assert not host.knows_word("dspers") and host.knows_word("dog")
    out = run(host, "rare_token", cfg, _images(3, seed=5), _opts(train_mode="lora_attn"))
    assert [s.name for s in out.stages] == ["token", "unet"] and out.delta and len(out.adapter.deltas) == 24
    vec = out.token.vectors["clip_l"]
    assert vec.shape == (1, 768) and (vec[0] - quaint).abs().max() > 1e-3, "the new row learned"
    # The result is spliced into a copy of the tokenizer; the original tokenizer never knew the word.
    assert models.tokenizer is not tokenizer and "dspers" not in tokenizer.get_vocab()
    assert torch.equal(models.encode_prompt("a photo of a dog"), plain), "other words unchanged"
    with torch.no_grad():
        ours = host.encode_prompt(out.prompts.usage, out.token)
    assert (ours - plain).abs().max() > 1e-3
    host.release()
    assert models.tokenizer is tokenizer
    assert _same_state(_state(models.text_encoder), te_before), "text encoder bit-identical"
    md = deltas.build_metadata(kind="embedding", family="sd1", title="dspers", method="rare_token", trigger="dspers")
    path = embeddings.save_embedding(deltas.exact_path(str(tmp_path), "dspers", what="trigger"), out.token.vectors, md,
                                     dtype="fp32")
    with LoraWarnings() as w:
        twin.load_textual_inversion(path, token="dspers")
    assert w.messages == []
    try:
        got = twin.encode_prompt(out.prompts.usage, "cpu", 1, False)[0].float().detach()
    finally:
        twin.unload_textual_inversion()
    _rel_close(got, ours, "diffusers load_textual_inversion vs diffusers host")


@pytest.mark.parametrize("feature_space, precision", [("pixel", "fp32"), ("latent", "bf16")])
def test_pixel_features_and_bf16_train(models, host, feature_space, precision):
    before = _state(models.unet)
    cfg = resolve_config("domainstudio", dict(steps=2, learning_rate=1e-3, batch_size=3, feature_space=feature_space))
    out = run(host, "domainstudio", cfg, _images(4), _opts(precision=precision))
    (stage,) = out.stages
    assert all(math.isfinite(v) for v in stage.history["total"]) and stage.steps_done == 2
    assert any(v.float().abs().max() > 0 for k, v in out.delta.items() if k.endswith("lora_up.weight"))
    if feature_space == "pixel":
        assert "hfmse" in stage.history and stage.history["hfmse"][0] > 0
    host.release()
    assert _same_state(_state(models.unet), before)


def test_sampler_matches_comfy_ksampler(comfy, sd15, models, host):
    """The sampler (Euler, 'normal' schedule, cfg) with no adapter is ComfyUI's KSampler on the same
    checkpoint: same sigmas, same noise per seed, same latents."""
    from comfy import sample, samplers

    model, clip, _ = sd15
    ms = model.get_model_object("model_sampling")
    assert torch.allclose(models.schedule.sampling_sigmas(5), samplers.calculate_sigmas(ms, "normal", 5).float(),
                          rtol=1e-5)
    pos = comfy.nodes.CLIPTextEncode().encode(clip, "a photo of a house")[0]
    neg = comfy.nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = torch.zeros([1, 4, 8, 8])
    theirs = sample.sample(model, sample.prepare_noise(latent, 7), 3, 6.0, "euler", "normal", pos, neg, latent,
                           disable_pbar=True, seed=7)
    ours = host.sample("a photo of a house", [7], resolution=64, steps=3, cfg=6.0)
    # ComfyUI returns VAE latents; the UNet (model) space is process_latent_in of them.
    _rel_close(model.model.process_latent_in(theirs), ours, "Euler sampler vs KSampler")


def test_textual_inversion_and_dreambooth_with_prior(models, host):
    """The other methods: textual_inversion trains only the vectors (no UNet delta); dreambooth trains
    the UNet with the prior term on class latents the source model samples."""
    tokenizer, before = models.tokenizer, _state(models.unet)
    ti_cfg = resolve_config("textual_inversion", dict(class_noun="house", new_token="dsti", ti_steps=2, num_vectors=2))
    ti = run(host, "textual_inversion", ti_cfg, _images(2, seed=7), _opts(train_seed=1))
    assert ti.delta is None and ti.adapter is None and ti.token.vectors["clip_l"].shape == (2, 768)
    assert dh.expand_trigger("a photo of dsti", "dsti", 2) == "a photo of dsti dsti_1"
    assert models.tokenizer.convert_tokens_to_ids(["dsti", "dsti_1"]) == [49408, 49409]
    host.release()
    assert models.tokenizer is tokenizer
    db_cfg = resolve_config("dreambooth", dict(class_noun="house", unet_steps=2, unet_learning_rate=1e-2,
                                               class_images=2, batch_size=1))
    seen = []
    db = run(host, "dreambooth", db_cfg, _images(2, seed=7), _opts(train_mode="lora_attn", lora_rank=2,
                                                                   lora_alpha=2.0, train_seed=1),
             on_progress=lambda p: seen.append((p.stage, p.step, p.total)))
    assert seen[:2] == [("class images", 1, 4), ("class images", 2, 4)]
    assert db.token is None and models.tokenizer is tokenizer and db.prompts.usage == "a photo of sks house"
    (stage,) = db.stages
    assert stage.name == "unet" and all(p > 0 for p in stage.history["prior"])
    assert any(v.float().abs().max() > 0 for k, v in db.delta.items() if k.endswith("lora_up.weight"))
    host.release()
    assert _same_state(_state(models.unet), before)
