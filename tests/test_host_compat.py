"""trainer/hosts/comfy_compat.py, the one place that relies on ComfyUI details beyond its documented
node-facing surface: every function exercised on the ComfyUI this run uses (CI runs the suite once per
host of .ci/hosts: 0.3.75 and 0.30.0). Also the gradient checkpointing of the ComfyUI host
(trainer/hosts/comfy.gradient_checkpointing), which must not change the gradients."""

import contextlib
import copy
import os

import pytest
import torch

from comfyui_domainstudio.testing.comfy_helpers import (encode, encode_pooled, personalize, progress_hook,
                                                         random_vectors, save_test_embedding, stripes,
                                                         subject_images, synthetic_lora, train_domainstudio,
                                                         unet_state)

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("unload_models")]


@pytest.fixture()
def compat(comfy):
    return comfy.pack("trainer.hosts.comfy_compat")


def _version():
    import comfyui_version

    return str(comfyui_version.__version__)


# --- checkpoints ---------------------------------------------------------------------------------

def test_checkpoint_state_dict_loads_back_as_sd15(comfy, sd15, compat, tmp_path):
    import comfy.supported_models as sm
    import safetensors.torch
    from comfy import sd as comfy_sd

    model, clip, vae = sd15
    sd = compat.checkpoint_state_dict(model.model, clip.cond_stage_model.state_dict(),
                                      vae.first_stage_model.state_dict())
    dm = model.model.diffusion_model.state_dict()
    assert {k for k in sd if k.startswith("model.diffusion_model.")} == {f"model.diffusion_model.{k}" for k in dm}
    path = str(tmp_path / "roundtrip.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)
    m2, c2, v2 = comfy_sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)[:3]
    assert type(m2.model.model_config) is sm.SD15
    assert type(v2.first_stage_model).__name__ == "TAESD"
    back = m2.model.diffusion_model.state_dict()
    assert all(torch.equal(back[k].float(), dm[k].float()) for k in dm)
    assert torch.equal(encode(comfy, c2, "a house"), encode(comfy, clip, "a house"))


# --- capabilities --------------------------------------------------------------------------------

def test_this_host_has_every_capability_and_its_version(compat):
    assert compat.missing_capabilities() == []
    compat.require("Any Node")  # does not raise
    assert compat.host_version() == _version() and compat.host_version() != "unknown"


@pytest.mark.parametrize("node_id, run", [
    ("DomainStudio_Train", lambda comfy, m, c, v: train_domainstudio(comfy, m, c, v, save_name="never")),
    ("DomainStudio_Personalize", lambda comfy, m, c, v: personalize(comfy, m, c, v, save_name="never")),
])
def test_missing_capability_is_named_by_the_node_before_training(comfy, sd15, compat, monkeypatch, loras_dir,
                                                                   embeddings_dir, node_id, run):
    from comfy import model_patcher

    monkeypatch.delattr(model_patcher.ModelPatcher, "add_weight_wrapper")
    missing = compat.missing_capabilities()
    assert missing == ["comfy.model_patcher.ModelPatcher.add_weight_wrapper (trainable weights (LoRA / full deltas))"]
    model, clip, vae = sd15
    seen = []
    with progress_hook(lambda v, t, p, node_id=None: seen.append(v)):
        with pytest.raises(Exception) as e:
            run(comfy, model, clip, vae)
    msg = str(e.value)
    assert f"ComfyUI ({_version()})" in msg and "ModelPatcher.add_weight_wrapper" in msg, msg
    assert "update ComfyUI" in msg
    assert seen == [] and os.listdir(loras_dir) == [] and os.listdir(embeddings_dir) == []


def test_missing_capability_in_load_weights(comfy, sd15, compat, monkeypatch, loras_dir):
    from comfy import sd as comfy_sd

    from comfyui_domainstudio.testing.comfy_helpers import save_synthetic

    model, clip, _ = sd15
    save_synthetic(comfy, model, loras_dir, "cap")
    monkeypatch.delattr(comfy_sd, "load_lora_for_models")
    with pytest.raises(Exception, match=rf"ComfyUI \({_version()}\).*comfy.sd.load_lora_for_models"):
        with torch.inference_mode():
            comfy.node("DomainStudio_LoadWeights").execute(model=model, clip=clip, file="loras/cap.safetensors",
                                                            strength_model=1.0, strength_clip=1.0,
                                                            ignore_mismatch=False)


def test_input_options_follow_the_hosts_schema(comfy, compat):
    import inspect

    from comfy_api.v0_0_2 import io

    supported = "advanced" in inspect.signature(io.Int.Input.__init__).parameters
    assert compat.input_options(True) == ({"advanced": True} if supported else {})
    assert compat.input_options(False) == {}
    cls = comfy.node("DomainStudio_Train")
    schema = cls.GET_SCHEMA() if hasattr(cls, "GET_SCHEMA") else cls.define_schema()
    inputs = {i.id: i for i in schema.inputs}
    assert getattr(inputs["lora_rank"], "advanced", None) is (True if supported else None)
    assert not getattr(inputs["steps"], "advanced", None), "essential inputs stay visible"
    info = cls.GET_NODE_INFO_V1()  # the schema serialises on this host either way
    assert "lora_rank" in str(info["input"])


def test_executing_context(compat):
    from comfy_execution.utils import CurrentNodeContext

    assert compat.executing_context() == (None, None)
    with CurrentNodeContext("prompt-1", "12"):
        assert compat.executing_context() == ("prompt-1", "12")
    assert compat.executing_context() == (None, None)


def test_trainable_memory_on_the_cpu(compat):
    free = compat.trainable_memory("cpu")
    assert isinstance(free, int) and free > 64 * 1024 ** 2


# --- the training session ------------------------------------------------------------------------

def test_run_in_sampling_applies_the_patchers_patches(comfy, sd15, compat):
    from comfy import model_management
    from comfy import sd as comfy_sd

    model, clip, _ = sd15
    model_management.unload_all_models()
    base = unet_state(model)
    lmodel, _ = comfy_sd.load_lora_for_models(model, None, synthetic_lora(comfy, model, mode="lora_attn", scale=0.1),
                                              1.0, 0.0)
    cond = comfy.nodes.CLIPTextEncode().encode(clip, "a house")[0]
    seen = {}

    def fn(inner, options):
        seen["inner"], seen["options"] = inner, options
        seen["state"] = {k: v.clone() for k, v in inner.diffusion_model.state_dict().items()}
        seen["grad"] = torch.is_grad_enabled()
        return "result"

    assert compat.run_in_sampling(lmodel, cond, (1, 4, 8, 8), fn) == "result"
    assert seen["inner"] is lmodel.model and isinstance(seen["options"], dict)
    changed = [k for k in base if not torch.equal(seen["state"][k], base[k])]
    assert changed and all(".attn" in k for k in changed), "the LoRA's patches are applied inside"
    # The unpatched model inside the same set-up sees its own weights.
    model_management.unload_all_models()
    compat.run_in_sampling(model, cond, (2, 4, 8, 8), fn)
    assert seen["inner"] is model.model and all(torch.equal(seen["state"][k], base[k]) for k in base)


def test_base_unet_state_ignores_a_loaded_lora_patched_clone(comfy, sd15, compat):
    from comfy import model_management
    from comfy import sd as comfy_sd

    chost = comfy.pack("trainer.hosts.comfy")
    model, _, _ = sd15
    model_management.unload_all_models()
    before = unet_state(model)
    fp = chost.fingerprint(model)
    lmodel, _ = comfy_sd.load_lora_for_models(model, None, synthetic_lora(comfy, model, scale=0.1), 1.0, 0.0)
    model_management.load_models_gpu([lmodel])  # writes the patches into the shared weights
    live = model.model.diffusion_model.state_dict()
    assert any(not torch.equal(live[k], before[k]) for k in before), "the shared weights are patched now"
    for m in (model, lmodel):
        state = compat.base_unet_state(m)
        assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
    assert chost.fingerprint(model) == fp == chost.fingerprint(lmodel)
    model_management.unload_all_models()


def test_make_autograd_safe_swaps_inference_tensors_value_for_value(compat):
    with torch.inference_mode():
        lin = torch.nn.Linear(3, 2)
        lin.register_buffer("scale", torch.full((2,), 2.0))
    values = {k: v.clone() for k, v in lin.state_dict().items()}
    assert all(v.is_inference() for v in (lin.weight, lin.bias, lin.scale))
    assert compat.make_autograd_safe(lin) == 3
    assert not any(v.is_inference() for v in (lin.weight, lin.bias, lin.scale))
    assert all(torch.equal(lin.state_dict()[k], values[k]) for k in values)
    x = torch.randn(4, 3, requires_grad=True)
    (lin(x) * lin.scale).sum().backward()
    assert x.grad is not None and compat.make_autograd_safe(lin) == 0


# --- words and vectors in prompts ----------------------------------------------------------------

def test_vocabulary_and_init_vectors(sd15, sdxl, compat):
    _, clip, _ = sd15
    assert set(compat.sub_tokenizers(clip.tokenizer)) == {"clip_l"}
    assert set(compat.sub_tokenizers(sdxl[1].tokenizer)) == {"clip_l", "clip_g"}
    assert compat.knows_word(clip, "dog") and compat.knows_word(clip, " Quaint ")
    assert not compat.knows_word(clip, "ds_subject") and not compat.knows_word(clip, "a dog")
    table = compat.input_embedding_table(clip, "clip_l")
    assert table.shape[1] == 768
    tok = compat.sub_tokenizers(clip.tokenizer)["clip_l"]
    (qid,) = compat._word_ids(tok, "quaint")
    init = compat.init_vectors(clip, "quaint", 3)
    assert set(init) == {"clip_l"} and init["clip_l"].shape == (3, 768) and init["clip_l"].dtype == torch.float32
    assert all(torch.equal(row, table[qid].float()) for row in init["clip_l"])
    ids = compat._word_ids(tok, "dsxyzzy")
    assert len(ids) > 1
    assert torch.allclose(compat.init_vectors(clip, "dsxyzzy", 1)["clip_l"][0], table[ids].float().mean(0))
    xl = compat.init_vectors(sdxl[1], "quaint", 2)
    assert {k: tuple(v.shape) for k, v in xl.items()} == {"clip_l": (2, 768), "clip_g": (2, 1280)}


@pytest.fixture()
def word_vectors():
    v = random_vectors(2, {"clip_l": 768}, seed=11, scale=1.0)
    return {k: (t * 0.5).float() for k, t in v.items()}


@pytest.fixture()
def stock_clip(comfy, tiny_models, embeddings_dir):
    """A fresh stock CLIP from the checkpoint loader; it lists the embeddings folder of the test."""
    def load():
        return comfy.nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(tiny_models["sd15"]))[1]
    return load


def test_clip_with_words_resolves_like_a_stock_embedding_file(comfy, sd15, compat, word_vectors, embeddings_dir,
                                                              stock_clip):
    _, clip, _ = sd15
    tokenizer_before = clip.tokenizer
    plain_before = encode(comfy, clip, "a photo of dsword")
    wclip = compat.clip_with_words(clip, {"dsword": word_vectors})
    bare = encode(comfy, wclip, "a photo of dsword")
    as_emb = encode(comfy, wclip, "a photo of embedding:dsword")
    assert torch.equal(bare, as_emb)
    assert not torch.allclose(bare, plain_before)
    # A stock CLIP reading the same vectors from an embedding file gives the same conditioning.
    save_test_embedding(comfy, embeddings_dir, "dsword", word_vectors, "sd1", dtype=torch.float32)
    stock = stock_clip()
    ref = encode(comfy, stock, "a photo of embedding:dsword")
    assert torch.allclose(bare, ref, atol=1e-5, rtol=1e-5), (bare - ref).abs().max()
    # Weights apply to the word as to the embedding, and multi-vector words splice every vector in order.
    weighted = encode(comfy, wclip, "a photo of (dsword:1.2)")
    assert not torch.allclose(weighted, bare)
    assert torch.allclose(weighted, encode(comfy, stock, "a photo of (embedding:dsword:1.2)"), atol=1e-5, rtol=1e-5)
    spliced = [t for t, *_ in wclip.tokenize("a dsword house")["l"][0] if isinstance(t, torch.Tensor)]
    assert len(spliced) == 2 and all(torch.equal(s, word_vectors["clip_l"][i]) for i, s in enumerate(spliced))
    # Other words keep their meaning; the input CLIP and its tokenizer are untouched.
    assert torch.equal(encode(comfy, wclip, "a photo of a house"), encode(comfy, clip, "a photo of a house"))
    assert clip.tokenizer is tokenizer_before and wclip.tokenizer is not clip.tokenizer
    assert not any(isinstance(t, torch.Tensor) for t, *_ in clip.tokenize("a photo of dsword")["l"][0])
    assert torch.equal(encode(comfy, clip, "a photo of dsword"), plain_before)
    # bare=False (an embedding applied by Load Weights): only embedding:word resolves.
    eclip = compat.clip_with_words(clip, {"dsword": word_vectors}, bare=False)
    assert torch.equal(encode(comfy, eclip, "a photo of embedding:dsword"), bare)
    assert torch.equal(encode(comfy, eclip, "a photo of dsword"), plain_before)


def test_prompts_with_the_marker_words_still_resolve(comfy, sd15, compat, word_vectors, embeddings_dir, stock_clip):
    _, clip, _ = sd15
    wclip = compat.clip_with_words(clip, {"dsword": word_vectors})
    save_test_embedding(comfy, embeddings_dir, "dsword", word_vectors, "sd1", dtype=torch.float32)
    stock = stock_clip()
    for prompt in ("a puffin next to dsword", "a puffin, a pelican and a heron with dsword on a gecko",
                   "puffin pelican heron gecko bison and dsword"):
        ours = encode(comfy, wclip, prompt)
        ref = encode(comfy, stock, prompt.replace("dsword", "embedding:dsword"))
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), prompt
    with pytest.raises(ValueError, match="free marker word"):  # every stand-in word already in the prompt
        wclip.tokenize("puffin pelican heron gecko bison yak dsword")


def test_splicing_clip_survives_deepcopy_and_stacks(comfy, sd15, compat, word_vectors):
    _, clip, _ = sd15
    wclip = compat.clip_with_words(clip, {"dsword": word_vectors})
    want = encode(comfy, wclip, "a dsword house")
    tok = copy.deepcopy(wclip.tokenizer)
    assert type(tok) is type(wclip.tokenizer) and set(tok.ds_words) == {"dsword"}
    deep = copy.deepcopy(wclip)
    assert torch.equal(encode(comfy, deep, "a dsword house"), want)
    # A second word on top of the first keeps both (e.g. Load Weights after Personalize).
    other = random_vectors(1, {"clip_l": 768}, seed=5, scale=1.0)
    both = compat.clip_with_words(wclip, {"dsother": other}, bare=False)
    assert torch.equal(encode(comfy, both, "a dsword house"), want)
    assert not torch.allclose(encode(comfy, both, "a embedding:dsother house"), encode(comfy, wclip,
                                                                                      "a embedding:dsother house"))


def test_sdxl_words_reach_both_encoders_and_wrong_architectures_are_refused(comfy, sd15, sdxl, compat):
    _, xl_clip, _ = sdxl
    vec = random_vectors(1, {"clip_l": 768, "clip_g": 1280}, seed=2, scale=1.0)
    wclip = compat.clip_with_words(xl_clip, {"dsxl": vec})
    cond, pooled = encode_pooled(wclip, "a dsxl house")
    plain_cond, plain_pooled = encode_pooled(xl_clip, "a dsxl house")
    assert not torch.allclose(cond[..., :768], plain_cond[..., :768])  # CLIP-L half
    assert not torch.allclose(cond[..., 768:], plain_cond[..., 768:])  # CLIP-G half
    assert not torch.allclose(pooled, plain_pooled)
    toks = wclip.tokenize("a dsxl house")
    for out_key, enc in (("l", "clip_l"), ("g", "clip_g")):
        (t,) = [t for t, *_ in toks[out_key][0] if isinstance(t, torch.Tensor)]
        assert torch.equal(t, vec[enc][0])
    sd1_only = compat.clip_with_words(xl_clip, {"dssd1": random_vectors(1, {"clip_l": 768})})
    with pytest.raises(ValueError, match="no vectors for the clip_g text encoder"):
        sd1_only.tokenize("a dssd1")
    with pytest.raises(ValueError, match="wrong architecture"):
        compat.clip_with_words(sd15[1], {"dsg": random_vectors(1, {"clip_g": 1280})})


# --- backpropagating through ComfyUI's CLIP ------------------------------------------------------

def _forward_patched(clip):
    from comfy import clip_model

    layers = [m for m in clip.cond_stage_model.modules() if isinstance(m, clip_model.CLIPLayer)]
    assert layers
    return [m for m in layers if "forward" in m.__dict__]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_differentiable_text_encoder_gives_gradients_to_spliced_vectors(request, compat, family):
    _, clip, _ = request.getfixturevalue(family)
    before = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    params = {k: torch.nn.Parameter(v) for k, v in compat.init_vectors(clip, "quaint", 2).items()}
    tclip = compat.clip_with_words(clip, {"ds_subject": params})
    with torch.inference_mode(False), torch.enable_grad():
        with compat.differentiable_text_encoder(tclip):
            cond, pooled = tclip.encode_from_tokens(tclip.tokenize("a photo of ds_subject dog"), return_pooled=True)
            (cond.float().square().mean() + pooled.float().square().mean()).backward()
    for k, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad.abs().sum(1) > 0).all(), k
    assert all(p.grad is None for p in clip.cond_stage_model.parameters())
    after = clip.cond_stage_model.state_dict()
    assert all(torch.equal(after[k].view(-1).view(torch.uint8) if after[k].is_floating_point() else after[k],
                           before[k].view(-1).view(torch.uint8) if before[k].is_floating_point() else before[k])
               for k in before)
    assert _forward_patched(tclip) == [] and _forward_patched(clip) == [], "no patched forward left behind"
    # Also when the block is left by an exception.
    with pytest.raises(KeyError):
        with compat.differentiable_text_encoder(tclip):
            raise KeyError("boom")
    assert _forward_patched(tclip) == []


def test_in_place_detection_matches_the_encoders_behaviour(sd15, compat):
    """_encoder_adds_in_place says whether a backward through this host's CLIP fails without the
    out-of-place forward; check that claim directly."""
    _, clip, _ = sd15
    needs = compat._encoder_adds_in_place(clip)
    vec = {"clip_l": torch.zeros(1, 768, requires_grad=True)}
    probe = compat.clip_with_words(clip, {"dsprobe": vec})
    clip.load_model()
    compat.make_autograd_safe(clip.cond_stage_model)

    def backward():
        with torch.inference_mode(False), torch.enable_grad():
            cond, _ = probe.encode_from_tokens(probe.tokenize("dsprobe"), return_pooled=True)
            cond.float().sum().backward()

    if needs:
        with pytest.raises(RuntimeError, match="inplace"):
            backward()
    else:
        backward()
        assert vec["clip_l"].grad is not None
    vec["clip_l"].grad = None
    with compat.differentiable_text_encoder(probe):
        backward()
    assert vec["clip_l"].grad is not None and vec["clip_l"].grad.abs().sum() > 0


# --- gradient checkpointing (issue requirement: same gradients, relative difference <= 1e-5) ------

class _RecordingHost:
    """Wraps ComfyHost to keep the live (trainable) token the run encodes prompts with."""

    @staticmethod
    def make(comfy, model, clip, vae):
        ComfyHost = comfy.pack("trainer.hosts.comfy").ComfyHost

        class Recording(ComfyHost):
            live = None

            def encode_prompt(self, text, token=None):
                if token is not None and any(v.requires_grad for v in token.vectors.values()):
                    self.live = token
                return super().encode_prompt(text, token)

        return Recording(model, clip, vae)


@contextlib.contextmanager
def _count_checkpointed(comfy):
    """Counts what trainer/hosts/comfy.gradient_checkpointing wraps (module class, blocks) and how
    many block forwards actually went through torch.utils.checkpoint."""
    import torch.utils.checkpoint

    chost = comfy.pack("trainer.hosts.comfy")
    real, real_checkpoint = chost.gradient_checkpointing, torch.utils.checkpoint.checkpoint
    counts = {"wrapped": [], "checkpointed": 0}

    @contextlib.contextmanager
    def counting(module):
        with real(module) as n:
            counts["wrapped"].append((type(module).__name__, n))
            yield n

    def checkpoint(*args, **kwargs):
        counts["checkpointed"] += 1
        return real_checkpoint(*args, **kwargs)

    chost.gradient_checkpointing, torch.utils.checkpoint.checkpoint = counting, checkpoint
    try:
        yield counts
    finally:
        chost.gradient_checkpointing, torch.utils.checkpoint.checkpoint = real, real_checkpoint


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _train_for_gradients(comfy, run_once, memory):
    """Gradients of one training step with memory=`memory`, and what was checkpointed in that step.
    The run is done twice: the first fills the memory plan's probe cache, so the counts of the
    second are the training step's own."""
    run_once(memory)
    with _count_checkpointed(comfy) as counts:
        grads, plan = run_once(memory)
    return grads, plan, counts


def test_gradient_checkpointing_gives_the_same_unet_gradients(comfy, sd15):
    core = comfy.pack("trainer.run")
    model, clip, vae = sd15
    cfg = core.resolve_config("domainstudio", dict(steps=1, batch_size=3, learning_rate=1e-3))

    def run_once(memory):
        opts = core.RunOptions(memory=memory, precision="fp32", train_mode="lora_all", lora_rank=4, lora_alpha=4.0,
                               max_grad_norm=0.0)
        out = core.run(comfy.pack("trainer.hosts.comfy").ComfyHost(model, clip, vae), "domainstudio", cfg,
                       stripes(4), opts)
        # Every LoRA factor's gradient of the step (up starts at zero, so down's is zero: compare both).
        return {d.name: torch.cat([d.up.grad.flatten(), d.down.grad.flatten()]) for d in out.adapter.layers()}, out.plan

    fast, fast_plan, fast_counts = _train_for_gradients(comfy, run_once, "max_speed")
    low, low_plan, low_counts = _train_for_gradients(comfy, run_once, "low")
    assert not fast_plan.checkpointing and fast_counts == {"wrapped": [], "checkpointed": 0}
    assert low_plan.checkpointing
    assert [name for name, _ in low_counts["wrapped"]] == ["UNetModel"] and low_counts["wrapped"][0][1] > 0
    assert low_counts["checkpointed"] > 0, "the step's blocks ran through torch.utils.checkpoint"
    a, b = torch.cat(list(low.values())), torch.cat(list(fast.values()))
    assert b.abs().sum() > 0
    print(f"UNet stage: relative gradient difference with checkpointing {_rel(a, b):.2e} "
          f"({low_counts['checkpointed']} checkpointed block calls)")
    assert _rel(a, b) <= 1e-5


def test_gradient_checkpointing_gives_the_same_token_gradients(comfy, sd15):
    core = comfy.pack("trainer.run")
    model, clip, vae = sd15
    cfg = core.resolve_config("textual_inversion", dict(class_noun="dog", new_token="ds_subject", ti_steps=1,
                                                        num_vectors=2, batch_size=2))

    def run_once(memory):
        host = _RecordingHost.make(comfy, model, clip, vae)
        out = core.run(host, "textual_inversion", cfg, subject_images(3), core.RunOptions(
            memory=memory, precision="fp32", max_grad_norm=0.0))
        return host.live.vectors["clip_l"].grad.clone(), out.plan

    fast, fast_plan, fast_counts = _train_for_gradients(comfy, run_once, "max_speed")
    low, low_plan, low_counts = _train_for_gradients(comfy, run_once, "low")
    assert not fast_plan.checkpointing and fast_counts == {"wrapped": [], "checkpointed": 0}
    # The UNet and the text encoder both recompute their activations in the backward pass.
    assert low_plan.checkpointing and sorted(name for name, _ in low_counts["wrapped"]) == ["SD1ClipModel", "UNetModel"]
    assert all(n > 0 for _, n in low_counts["wrapped"]) and low_counts["checkpointed"] > 0
    assert fast.abs().sum() > 0
    print(f"token stage: relative gradient difference with checkpointing {_rel(low, fast):.2e} "
          f"({low_counts['checkpointed']} checkpointed block calls)")
    assert _rel(low, fast) <= 1e-5
