"""Hardening: what a prompt from anyone who reaches the server can make it do, and what a broken
disk, a crash or a bad setting can take away (the issue "Security and never losing work").

Table-driven. Each `Row` is one node's inputs and what must (not) happen; every row runs on two
surfaces:

* ``node``: the node class ComfyUI registered, called in-process (the ``comfy`` fixture), with
  ComfyUI's input/temp/output directories and its first models/loras and models/embeddings folders
  pointed at scratch folders for the duration;
* ``server``: a real ``main.py --cpu`` (testing/comfy_server.py) of this module, started with
  DOMAINSTUDIO_IMAGE_ROOTS and DOMAINSTUDIO_MEMORY_BYTES set, fed an API workflow over HTTP (the
  node, plus stock nodes that show or use its outputs), the error read from /ws; afterwards the
  server must answer and run a new prompt.

Rows of the Few-Shot Image Set node (`refused`, `fails`, `works`) check folder confinement; rows of
the trainer nodes and Load Weights (section "training, saving and weight files") check: the message
(`expect`), what it must not reveal (`forbid`: server paths), the files that must (not) exist
afterwards, that name/folder/memory problems stop BEFORE training (`no_training`: no training step
ran, counted in-process by the loop, on the server by progress events), that a save failure still
returns the trained MODEL/delta to stock KSampler and Save LoRA Weights (`returns`), and Cancel in
every stage (`cancel_at`). Folder faults (a full disk, a read-only folder, a file where the folder
should be) come from testing/hardening.py.

Strings in a row may use these placeholders, filled per surface by `Ctx.fmt`:

  {input}   ComfyUI's input directory           {temp} / {output}  its temp / output directories
  {outside} a folder of images outside every root {outside_rel} the same without the leading '/'
  {allowed} a folder allowed only through DOMAINSTUDIO_IMAGE_ROOTS
  {up}      enough '../' to climb to '/' from anywhere
  {loras} / {embeddings}  the first models/loras / models/embeddings folder   {models} their parent
  {mark}    the file a malicious pickle would create when unpickled

`forbid` fragments must not appear in anything the client is shown (on the server: the whole
execution_error payload) once the user's own string is taken out: echoing the input back is fine,
revealing what it resolved to is not. ComfyUI attaches a traceback of code locations (file:line of
ComfyUI and the pack) to every execution_error; a fragment that is part of those code paths (e.g.
'/root' when ComfyUI lives under /root/.cache) is not checked inside the traceback.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_domainstudio.testing import hardening
from comfyui_domainstudio.testing.harness import REPO, TESTS, comfy_dir

pytestmark = [pytest.mark.comfy]

ROOTS_ENV = "DOMAINSTUDIO_IMAGE_ROOTS"
MEMORY_ENV = "DOMAINSTUDIO_MEMORY_BYTES"
# A small machine for every run of this module (both surfaces): 1 GiB free. A 64 px step of the tiny
# models needs 0.05-0.4 GiB, so every normal row fits; the memory rows ask for far more.
MEMORY_BYTES = str(1 << 30)
IMAGE_SET = "DomainStudio_FewShotImageSet"
TRAIN = "DomainStudio_Train"
SUBJECT = "DomainStudio_Personalize"
WEIGHTS = "DomainStudio_LoadWeights"
# Output slots of each node (server: what stock nodes are wired to).
SLOTS = {TRAIN: {"model": 0, "delta": 1, "text": 3}, SUBJECT: {"model": 0, "clip": 1, "delta": 3, "text": 5},
         WEIGHTS: {"model": 0, "clip": 1, "text": 2}}
# The generic refusal (trainer/imageset.py refusal_message); identical for every refused folder.
REFUSAL = "is not a folder of images inside ComfyUI's input directory"
# Never shown to a client, whatever the row.
SECRETS = ("{outside}", "{allowed}", "{input}", "/usr/share", "/etc/", "/root", "/home/",
           "does not exist", "is a file", "not a directory", "Permission denied", "No such file")


# ------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Row:
    id: str
    inputs: dict  # the node's inputs (JSON values; strings may hold placeholders)
    expect: str | None  # fragment of the error message; None = the node must succeed
    node: str = IMAGE_SET
    refused: bool = False  # the generic refusal: same message as every other refused row
    forbid: tuple[str, ...] = SECRETS
    must_not_exist: tuple[str, ...] = ()  # glob patterns that must match nothing afterwards
    no_new_files_in: tuple[str, ...] = ("{temp}", "{output}")  # dirs that must gain no file
    expect_images: int | None = None  # success: images the node outputs (server: previews served)
    preview_slot: int | None = 1  # server: the output fed to a PreviewImage (None: node is an output)
    check: Callable[["Ctx", Any], None] | None = None  # node surface, success: extra checks on result
    surfaces: tuple[str, ...] = ("node", "server")
    # --- trainer / Load Weights rows (run_node_train / run_server_train)
    setup: tuple[tuple[str, str], ...] = ()  # (testing.hardening fault, folder) made before the run
    during: tuple[tuple[str, str], ...] = ()  # ... made when progress value `during_at` is reported
    during_at: int = 1
    no_training: bool = False  # refused before any training step
    returns: bool = False  # success: MODEL -> stock KSampler, delta -> stock Save LoRA Weights work
    message: tuple[str, ...] = ()  # success: fragments of the node's text output and final progress event
    must_exist: tuple[str, ...] = ()  # glob patterns that must match afterwards
    cancel_at: int | None = None  # press Cancel when this progress value is reported
    nan_at: int | None = None  # node surface: the host's loss turns NaN at this training step
    verify: Callable[["Ctx", "Run"], None] | None = None  # extra checks, both surfaces
    expect_server: str | tuple[str, ...] | None = None  # the server's, where hosts differ (combo validation)


BASE = {"resolution": 64, "flip": False}


def refused(id: str, folder: str, **kw) -> Row:
    return Row(id, {**BASE, "folder": folder}, REFUSAL, refused=True, **kw)


def fails(id: str, folder: str, expect: str, **kw) -> Row:
    return Row(id, {**BASE, "folder": folder}, expect, **kw)


def works(id: str, folder: str, n: int, **kw) -> Row:
    return Row(id, {**BASE, "folder": folder}, None, expect_images=n, no_new_files_in=("{output}",), **kw)


def _captions_of_my_style(ctx, image_set):
    assert image_set.names == ["a.png", "b.png"]
    assert image_set.captions == ["a red square, flat", None]
    assert "captions for 1 of 2" in image_set.describe()


def _link_skipped(ctx, image_set):
    assert image_set.names == ["real.png"]
    assert any("skipped 'link.png'" in w for w in image_set.warnings), image_set.warnings
    for w in image_set.warnings:
        assert ctx.fmt("{outside}") not in w and ctx.fmt("{input}") not in w


ROWS: list[Row] = [
    # Allowed: inside the input directory, or inside a folder the owner opted in.
    works("input_subfolder", "my_style", 2, check=_captions_of_my_style),
    works("input_subfolder_absolute", "{input}/my_style", 2),
    works("input_subfolder_quoted", ' "my_style" ', 2),
    works("env_allowed_absolute", "{allowed}", 2),
    works("env_allowed_quoted", "'{allowed}'", 2),
    works("link_inside_input_to_allowed", "to_allowed", 2),
    works("file_link_escaping_is_skipped", "mixed_links", 1, check=_link_skipped),
    # Refused, all with the one message.
    refused("absolute_outside", "{outside}"),
    refused("absolute_usr_share", "/usr/share/pixmaps"),
    refused("absolute_root", "/"),
    refused("dotdot_to_outside", "{up}{outside_rel}"),
    refused("dotdot_usr_share", "{up}usr/share/pixmaps"),
    refused("dotdot_input_parent", ".."),
    refused("dotdot_via_subfolder", "my_style/../../"),
    refused("absolute_input_parent", "{input}/.."),
    refused("tilde", "~"),
    refused("tilde_root", "~root"),
    refused("tilde_ssh", "~/.ssh"),
    refused("tilde_root_ssh", "~root/.ssh"),
    refused("symlink_in_input_to_outside", "escape"),
    refused("quoted_outside", '"{outside}"'),
    refused("single_quoted_outside_spaces", "  '{outside}'  "),
    refused("file_not_folder", "photo.png"),
    refused("missing", "no_such_folder", forbid=SECRETS + ("{input}/no_such_folder",)),
    refused("missing_absolute_in_input", "{input}/no_such_folder"),
    refused("etc_shadow", "/etc/shadow"),
    refused("etc", "/etc"),
    refused("root_ssh", "/root/.ssh"),
    refused("home_ssh", "/home/nobody/.ssh"),
    refused("nul_byte", "my_style\x00/../../../etc"),
    refused("very_long_name", "a" * 5000),
    # Inside the input directory: specific messages that name files relative to the folder.
    fails("empty_folder", "empty", "contains no supported images"),
    fails("corrupt_file", "corrupt", "'broken.png'"),
    fails("caption_too_long", "long_caption", "caption file 'a.txt'"),
    Row("too_many_caption_lines", {**BASE, "folder": "my_style", "captions": "x\ny\nz"},
        "captions has 3 lines but only 1 images take a caption"),
]


# ------------------------------------------------------------------ training, saving and weight files


@dataclass(frozen=True)
class Src:
    """A node input that is another node's output: node surface, the object; server, a link to a
    stock node (or test node) that makes it."""

    kind: str  # model clip vae sdxl_model sdxl_clip | images image_set (Few-Shot Image Set) | empty | tensor
    args: tuple = ()


MODEL, CLIP, VAE, SDXL_MODEL, SDXL_CLIP = Src("model"), Src("clip"), Src("vae"), Src("sdxl_model"), Src("sdxl_clip")


def images(folder: str = "subject", resolution: int = 64) -> Src:
    return Src("images", (folder, resolution))


def image_set(folder: str = "subject", resolution: int = 64) -> Src:
    return Src("image_set", (folder, resolution))


def empty_images(width: int, height: int, batch: int) -> Src:
    """Stock EmptyImage (a flat IMAGE batch of any size)."""
    return Src("empty", (width, height, batch))


def tensor(name: str) -> Src:
    """An IMAGE input no stock node makes (node surface only): see TENSORS."""
    return Src("tensor", (name,))


TENSORS = {"empty": lambda: torch.rand(0, 64, 64, 3), "nan": lambda: torch.full((2, 64, 64, 3), float("nan")),
           "flat_2d": lambda: torch.rand(64, 64), "text": lambda: "not an image"}

# Server paths (and system folders) a client must never be shown.
PATHS = ("{loras}", "{embeddings}", "{models}", "{input}", "{temp}", "{output}", "/tmp/", "/etc/", "/root", "/home/")
FOLDERS = ("{loras}", "{embeddings}")

DOMAIN = dict(model=MODEL, clip=CLIP, vae=VAE, images=images(), method="finetune", target_prompt="a sks house",
              source_prompt="a house", steps=1, learning_rate=1e-3, batch_size=1, resolution=64, precision="fp32",
              train_mode="lora_attn", lora_rank=4, lora_alpha=4.0, train_seed=0, save_name="")
PERSON = dict(model=MODEL, clip=CLIP, vae=VAE, images=images(), method="dreambooth_no_prior", class_noun="dog",
              new_token="ds_hard", init_word="quaint", num_vectors=1, ti_steps=1, ti_learning_rate=5e-2,
              unet_steps=1, unet_learning_rate=1e-3, class_images=2, batch_size=1, resolution=64, precision="fp32",
              train_mode="lora_attn", lora_rank=4, lora_alpha=4.0, train_seed=0, save_name="")
LOAD = dict(model=MODEL, clip=CLIP, strength_model=1.0, strength_clip=1.0, ignore_mismatch=False)

_ROW_FIELDS = set(Row.__dataclass_fields__)


def _row(node: str, base: dict, id: str, expect, kw: dict) -> Row:
    row_kw = {k: v for k, v in kw.items() if k in _ROW_FIELDS}
    inputs = {**base, **{k: v for k, v in kw.items() if k not in _ROW_FIELDS}}
    return Row(id, inputs, expect, **{"node": node, "forbid": PATHS, "no_new_files_in": FOLDERS,
                                      "preview_slot": None, **row_kw})


def domain(id: str, expect=None, **kw) -> Row:
    """DomainStudio Train (default: plain fine-tuning, 1 LoRA step at 64 px)."""
    return _row(TRAIN, DOMAIN, id, expect, kw)


def subject(id: str, expect=None, **kw) -> Row:
    """Personalize (default: DreamBooth without prior, 1 LoRA step at 64 px)."""
    return _row(SUBJECT, PERSON, id, expect, kw)


def weights(id: str, file: str, expect=None, **kw) -> Row:
    """Load Weights with one of the files testing.hardening.make_weight_files wrote."""
    return _row(WEIGHTS, LOAD, id, expect, {"file": file, **kw})


FIX = "make ComfyUI's models/loras folder a writable folder"
SAVE_FAILED = ("saving to ComfyUI's models/loras folder failed", "the trained model and delta are still returned",
               "Save LoRA")
MEMORY = ("this training step needs about", "but only 1.00 GiB is free in this machine's RAM",  # MEMORY_BYTES
          "settings that would fit")
NAMES = (("dotdot", "../escape"), ("dots_only", ".."), ("slash", "sub/name"), ("colon", "c:name"),
         ("nul", "a\x00b"), ("300_chars", "n" * 300))
UNREADABLE = "is not a readable safetensors file"


@dataclass
class Run:
    """What one run of a trainer / Load Weights row showed."""

    error: str | None = None
    interrupted: bool = False
    progress: list[int] = field(default_factory=list)  # progress values the trainer node reported
    events: list[dict] = field(default_factory=list)  # its domainstudio.progress payloads
    steps: int | None = None  # training steps taken (node surface: counted in the loop)
    text: str = ""  # the node's text output (saved files / Load Weights info)
    new_files: set[str] = field(default_factory=set)  # in the model folders
    result: Any = None
    cancel_at: int | None = None
    cancel_sent: bool = False
    cancel_value: int | None = None  # the progress value at which Cancel was pressed

    @property
    def final(self) -> dict:
        ends = [e for e in self.events if e.get("status") in ("done", "error", "cancelled")]
        return ends[-1] if ends else {}


def _kept(folder: str, stem: str, stage_start: int, extra: tuple[str, ...] = ()):
    """Cancel with on_cancel=keep: exactly `<stem>_partial_<step>` + its .dsstate (and `extra`) were
    written, step within one of where Cancel was pressed, and the final event names the file."""

    def verify(ctx: "Ctx", run: Run):
        found = sorted(glob.glob(os.path.join(ctx.fmt(folder), f"{stem}_partial_*.safetensors")))
        assert len(found) == 1, found
        step = int(re.search(r"_partial_(\d+)\.safetensors$", found[0]).group(1))
        cancel, last = run.cancel_value - stage_start, run.progress[-1] - stage_start
        assert cancel <= step <= last + 1, (step, run.progress)
        state = found[0][: -len(".safetensors")] + ".dsstate"
        assert run.new_files == {found[0], state} | {ctx.fmt(e) for e in extra}, run.new_files
        message = run.final.get("message", "")
        assert message.startswith("kept ") and os.path.basename(found[0]) in message, run.final

    return verify


def _nothing_kept(ctx: "Ctx", run: Run):
    assert not run.new_files, run.new_files
    assert "kept" not in run.final.get("message", ""), run.final


def _embedding_widths(name: str, widths: dict[str, int], n: int):
    def verify(ctx: "Ctx", run: Run):
        from safetensors.torch import load_file

        tensors = load_file(os.path.join(ctx.embeddings, name + ".safetensors"))
        assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: (n, w) for k, w in widths.items()}
        assert all(torch.isfinite(v).all() for v in tensors.values())

    return verify


ROWS += [
    # --- Saves never lose the training. Broken before training: refused before any step.
    domain("save_disk_full_before_training", ("cannot write to the models/loras folder (No space left on device)",
                                              FIX), save_name="hd_full", setup=(("full", "{loras}"),),
           no_training=True),
    domain("save_folder_read_only_before_training", ("cannot write to the models/loras folder", FIX),
           save_name="hd_ro", setup=(("readonly", "{loras}"),), no_training=True),
    domain("save_folder_is_a_file_before_training", ("models/loras", FIX), save_name="hd_file",
           setup=(("file", "{loras}"),), no_training=True),
    subject("subject_embeddings_folder_is_a_file_before_training",
            ("models/embeddings", "make ComfyUI's models/embeddings folder a writable folder"), method="rare_token",
            new_token="ds_embfile", save_name="hd_embfile", setup=(("file", "{embeddings}"),), no_training=True),
    subject("subject_loras_read_only_before_training", ("cannot write to the models/loras folder", FIX),
            method="rare_token", new_token="ds_subro", save_name="hd_subro", setup=(("readonly", "{loras}"),),
            no_training=True),
    # Broken while training: the MODEL and delta still come out, the message names the folder and
    # the fix, and no partial or temporary file is left.
    domain("save_disk_fills_during_training_returns_the_result", None, save_name="hd_fullsave", steps=4,
           setup=(("tmpfs", "{loras}"),), during=(("fill", "{loras}"),), returns=True,
           message=SAVE_FAILED + ("No space left on device",)),
    domain("save_folder_read_only_during_training_returns_the_result", None, save_name="hd_ro_late", steps=2,
           during=(("readonly", "{loras}"),), returns=True, message=SAVE_FAILED, surfaces=("node",)),
    domain("save_folder_becomes_a_file_during_training_returns_the_result", None, save_name="hd_file_late",
           steps=2, during=(("file", "{loras}"),), returns=True, message=SAVE_FAILED, surfaces=("node",)),
    # Two files: the embedding is written, the LoRA fails, the message says exactly that.
    subject("subject_two_files_embedding_written_lora_failed", None, method="rare_token", new_token="ds_two",
            unet_steps=4, save_name="hd_two", setup=(("tmpfs", "{loras}"),), during=(("fill", "{loras}"),),
            during_at=2, returns=True, message=SAVE_FAILED + ("Written before the failure: ds_two.safetensors",),
            no_new_files_in=("{loras}",), must_exist=("{embeddings}/ds_two.safetensors",)),
    # The disk fills while the token trains: the UNet stage is refused before it trains (its file
    # cannot fit) and the finished token is kept.
    subject("subject_disk_full_before_unet_stage_keeps_the_token",
            ("models/loras folder has", "The finished token stage was kept: ds_keep.safetensors"),
            method="rare_token", new_token="ds_keep", ti_steps=3, save_name="hd_keep", setup=(("tmpfs", "{loras}"),),
            during=(("fill", "{loras}"),), no_new_files_in=("{loras}",),
            must_exist=("{embeddings}/ds_keep.safetensors",)),
    # --- Names: refused before training, naming the input.
    *[subject(f"subject_save_name_{tag}", "save_name", save_name=name, no_training=True) for tag, name in NAMES],
    *[subject(f"subject_new_token_{tag}", "new_token", method="textual_inversion", new_token=name,
              save_name="hd_tok", no_training=True) for tag, name in NAMES],
    domain("domain_save_name_dotdot", "save_name", save_name="../../x", no_training=True),
    domain("domain_save_name_absolute", "save_name", save_name="/etc/cron.d/x", no_training=True),
    # --- Widths: an SDXL embedding keeps each encoder's width (768 and 1280) and is saved.
    subject("subject_sdxl_embedding_keeps_each_encoder_width", None, model=SDXL_MODEL, clip=SDXL_CLIP,
            method="textual_inversion", new_token="ds_wide", num_vectors=2, save_name="hd_wide",
            no_new_files_in=("{loras}",), message=("saved embeddings/ds_wide.safetensors",),
            verify=_embedding_widths("ds_wide", {"clip_l": 768, "clip_g": 1280}, 2)),
    # --- Memory guard: refused before training with the estimate, what is free, and what would fit.
    subject("memory_resolution_4096_image_set", MEMORY + ("resolution",), images=None,
            image_set=image_set("one", 4096), save_name="hd_mem1", no_training=True),
    subject("memory_resolution_4096_images_input", MEMORY + ("resolution",), images=images("one"),
            resolution=4096, save_name="hd_mem2", no_training=True),
    subject("memory_batch_64", MEMORY + ("batch_size",), images=empty_images(64, 64, 64), batch_size=64,
            train_mode="full_all", memory="max_speed", save_name="hd_mem3", no_training=True),
    # --- Divergence and NaN: stopped with the hint, no delta written.
    domain("diverged_full_all_learning_rate_1", ("train: the loss diverged", "Lower the learning rate (now 1)"),
           train_mode="full_all", learning_rate=1.0, steps=5, save_name="hd_div"),
    # LoRAs start kohya's way (up = 0): step 1 moves only `up`, step 2's delta blows up, step 3 is nan
    subject("nan_loss_stops_naming_the_step", ("unet: loss became nan at step 3", "Lower the learning rate"),
            train_mode="lora_all", lora_rank=1, lora_alpha=1024.0, unet_learning_rate=1.0, unet_steps=4,
            save_name="hd_nan"),
    domain("nan_loss_from_the_host_stops_naming_the_step", "train: loss became nan at step 3",
           method="domainstudio", batch_size=3, steps=5, save_name="hd_nan_host", nan_at=3, surfaces=("node",)),
    # --- Cancel in every stage: stops within a step; keep writes <name>_partial_<step> + .dsstate.
    subject("cancel_class_images_keeps_nothing", None, method="dreambooth", class_images=3, unet_steps=2,
            save_name="hd_c_cls", cancel_at=1, verify=_nothing_kept),
    subject("cancel_token_stage_keep", None, method="rare_token", new_token="ds_ctok", ti_steps=5,
            save_name="hd_c_tok", cancel_at=2, no_new_files_in=(), verify=_kept("{embeddings}", "ds_ctok", 0)),
    subject("cancel_token_stage_discard", None, method="rare_token", new_token="ds_ctokd", ti_steps=5,
            on_cancel="discard", save_name="hd_c_tokd", cancel_at=2, verify=_nothing_kept),
    subject("cancel_unet_stage_keep", None, method="rare_token", new_token="ds_cunet", unet_steps=12,
            save_name="hd_c_unet", cancel_at=3, no_new_files_in=(),
            verify=_kept("{loras}", "hd_c_unet", 1, extra=("{embeddings}/ds_cunet.safetensors",))),
    subject("cancel_unet_stage_discard", None, method="rare_token", new_token="ds_cunetd", unet_steps=12,
            on_cancel="discard", save_name="hd_c_unetd", cancel_at=3, verify=_nothing_kept),
    domain("cancel_domainstudio_keep", None, method="domainstudio", batch_size=3, steps=5, save_name="hd_c_dom",
           cancel_at=2, no_new_files_in=(), verify=_kept("{loras}", "hd_c_dom", 0)),
    domain("cancel_domainstudio_discard", None, method="domainstudio", batch_size=3, steps=5, on_cancel="discard",
           save_name="hd_c_domd", cancel_at=2, verify=_nothing_kept),
    # --- Load Weights: every hostile file refused by its list name.
    weights("weights_good_file_applies", "loras/good.safetensors", None, returns=True,
            message=("loras/good.safetensors",)),
    weights("weights_nan_values", "loras/nan.safetensors", "loras/nan.safetensors holds NaN or infinite values"),
    weights("weights_inf_values", "loras/inf.safetensors", "loras/inf.safetensors holds NaN or infinite values"),
    weights("weights_wrong_layer_shapes_counted", "loras/wrong_shapes.safetensors",
            "2 of 9 weights in loras/wrong_shapes.safetensors have the wrong shape for their layer"),
    weights("weights_sdxl_file_on_sd15", "loras/sdxl_made.safetensors",
            "loras/sdxl_made.safetensors: it was made for a sdxl model but the loaded model is sd1"),
    weights("weights_other_architecture", "loras/other_arch.safetensors",
            "9 of 9 weights in loras/other_arch.safetensors match no layer of the loaded model"),
    weights("weights_pickle_renamed_safetensors", "loras/pickle_renamed.safetensors",
            "loras/pickle_renamed.safetensors " + UNREADABLE),
    weights("weights_malicious_pickle_is_never_unpickled", "loras/evil.pt",
            ("loras/evil.pt could not be read with torch.load(weights_only=True)", "never unpickled"),
            must_not_exist=("{mark}",)),
    weights("weights_malicious_pickle_embedding", "embeddings/evil_emb.pt",
            "embeddings/evil_emb.pt could not be read with torch.load(weights_only=True)", must_not_exist=("{mark}",)),
    weights("weights_100mb_header", "loras/huge_header.safetensors", "loras/huge_header.safetensors " + UNREADABLE),
    weights("weights_absurd_shape", "loras/absurd_shape.safetensors", "loras/absurd_shape.safetensors " + UNREADABLE),
    weights("weights_absurd_offsets", "loras/absurd_offsets.safetensors",
            "loras/absurd_offsets.safetensors " + UNREADABLE),
    weights("weights_empty_file", "loras/empty.safetensors", "loras/empty.safetensors " + UNREADABLE),
    weights("weights_corrupt_file", "loras/corrupt.safetensors", "loras/corrupt.safetensors " + UNREADABLE),
    weights("weights_truncated_file", "loras/truncated.safetensors", "loras/truncated.safetensors " + UNREADABLE),
    weights("weights_embedding_nan", "embeddings/nan_emb.safetensors",
            "embeddings/nan_emb.safetensors: embedding vectors['clip_l'] has non-finite (NaN or infinite) values"),
    weights("weights_embedding_wrong_width", "embeddings/wide_emb.safetensors",
            "embeddings/wide_emb.safetensors holds vectors for [('clip_l', 1024)]"),
    weights("weights_embedding_corrupt", "embeddings/corrupt_emb.safetensors",
            "embeddings/corrupt_emb.safetensors " + UNREADABLE),
    # (ComfyUI 0.30.0 refuses a value that is not among a combo's options before the node runs;
    # 0.3.75 does not check the combos of V3 nodes, so there the node's own check answers.)
    weights("weights_path_traversal", "loras/../../../../etc/passwd", "was not found in models/loras",
            expect_server=("file", "loras/../../../../etc/passwd")),
    # --- Bad inputs.
    subject("images_empty_batch", "no images", images=tensor("empty"), surfaces=("node",), no_training=True),
    subject("images_nan_values", "contains NaN or infinite values", images=tensor("nan"), surfaces=("node",),
            no_training=True),
    subject("images_wrong_layout", "expected [N, H, W, C]", images=tensor("flat_2d"), surfaces=("node",),
            no_training=True),
    subject("images_not_an_image", "not an IMAGE tensor", images=tensor("text"), surfaces=("node",),
            no_training=True),
    subject("images_one_pixel_is_upscaled_and_trains", None, images=empty_images(1, 1, 1), save_name="",
            returns=True),
    subject("negative_lambda_prior", "lambda_prior", method="dreambooth", lambda_prior=-1.0, save_name="hd_lp",
            no_training=True),
    subject("nan_learning_rate", "unet_learning_rate", unet_learning_rate=float("nan"), save_name="hd_lrnan",
            no_training=True),
    domain("unknown_method", "method='evil' is unknown", method="evil", save_name="hd_m",
           expect_server=("method", "'evil'"), no_training=True),
    domain("resume_from_path_traversal", "resume_from='loras/../../../../etc/passwd' was not found in models/loras",
           resume_from="loras/../../../../etc/passwd", save_name="hd_res",
           expect_server=("resume_from", "loras/../../../../etc/passwd"), no_training=True),
]


# ------------------------------------------------------------------ scratch folders


def _png(path: str, color, size=(80, 64)) -> None:
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:] = color
    Image.fromarray(arr).save(path)


def make_outside(root: str) -> dict[str, str]:
    """Folders that exist for real, so a refusal proves confinement rather than a missing path."""
    outside, allowed = os.path.join(root, "outside"), os.path.join(root, "allowed")
    for d, color in ((outside, (200, 0, 0)), (allowed, (0, 0, 200))):
        os.makedirs(d, exist_ok=True)
        _png(os.path.join(d, "o1.png"), color)
        _png(os.path.join(d, "o2.png"), color)
    with open(os.path.join(outside, "o1.txt"), "w") as f:
        f.write("secret caption from outside")
    return {"outside": outside, "allowed": allowed}


def make_input(input_dir: str, outside: str, allowed: str) -> None:
    os.makedirs(input_dir, exist_ok=True)
    d = os.path.join(input_dir, "my_style")
    os.makedirs(d, exist_ok=True)
    _png(os.path.join(d, "a.png"), (255, 0, 0))
    _png(os.path.join(d, "b.png"), (0, 255, 0))
    with open(os.path.join(d, "a.txt"), "w", encoding="utf-8") as f:
        f.write("  a red square,\nflat \n")
    _png(os.path.join(input_dir, "photo.png"), (1, 2, 3))
    os.makedirs(os.path.join(input_dir, "empty"), exist_ok=True)
    d = os.path.join(input_dir, "corrupt")
    os.makedirs(d, exist_ok=True)
    _png(os.path.join(d, "good.png"), (5, 5, 5))
    with open(os.path.join(d, "broken.png"), "wb") as f:
        f.write(b"not a png at all" * 8)
    d = os.path.join(input_dir, "long_caption")
    os.makedirs(d, exist_ok=True)
    _png(os.path.join(d, "a.png"), (9, 9, 9))
    with open(os.path.join(d, "a.txt"), "w", encoding="utf-8") as f:
        f.write("word " * 1000)
    d = os.path.join(input_dir, "mixed_links")
    os.makedirs(d, exist_ok=True)
    _png(os.path.join(d, "real.png"), (7, 7, 7))
    for link, target in ((os.path.join(d, "link.png"), os.path.join(outside, "o1.png")),
                         (os.path.join(input_dir, "escape"), outside),
                         (os.path.join(input_dir, "to_allowed"), allowed)):
        if not os.path.islink(link):
            os.symlink(target, link)
    # training images: three subject photos, and a single one
    for folder, colors in (("subject", ((200, 40, 20), (30, 160, 60), (40, 60, 190))), ("one", ((120, 90, 30),))):
        d = os.path.join(input_dir, folder)
        os.makedirs(d, exist_ok=True)
        for i, color in enumerate(colors):
            _png(os.path.join(d, f"s{i}.png"), color, size=(64, 64))


def make_models(base: str, layers: dict, mark: str) -> tuple[str, str]:
    """models/loras and models/embeddings under `base`, holding the weight files of the Load Weights rows."""
    loras, embeddings = os.path.join(base, "models", "loras"), os.path.join(base, "models", "embeddings")
    hardening.make_weight_files(loras, embeddings, layers, mark)
    return loras, embeddings


@dataclass
class Ctx:
    surface: str
    input: str
    temp: str
    output: str
    outside: str
    allowed: str
    server: Any = None
    comfy: Any = None
    code_paths: tuple[str, ...] = field(default_factory=tuple)
    loras: str = ""
    embeddings: str = ""
    mark: str = ""
    sd15: Any = None  # node surface: (MODEL, CLIP, VAE)
    sdxl_paths: Any = None
    cache: dict = field(default_factory=dict)
    steps: int = 0  # node surface: training steps taken in the current row (the loop counts them)
    nan_at: int | None = None
    events: list = field(default_factory=list)  # node surface: domainstudio.progress payloads

    @property
    def models(self) -> str:
        return os.path.dirname(self.loras)

    def fmt(self, value):
        if isinstance(value, str):
            if "{" not in value:
                return value
            return value.format_map({
                "input": self.input, "temp": self.temp, "output": self.output,
                "outside": self.outside, "outside_rel": self.outside.lstrip("/"),
                "allowed": self.allowed, "up": "../" * 40, "loras": self.loras, "embeddings": self.embeddings,
                "models": self.models, "mark": self.mark,
            })
        if isinstance(value, dict):
            return {k: self.fmt(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.fmt(v) for v in value)
        return value


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory) -> dict[str, str]:
    root = str(tmp_path_factory.mktemp("hardening"))
    return {**make_outside(root), "mark": os.path.join(root, "unpickled_marker")}


@pytest.fixture(scope="module")
def node_ctx(comfy, shared_dirs, tmp_path_factory, sd15, tiny_models):
    """ComfyUI's input, temp and output directories and its first models/loras and
    models/embeddings folders pointed at scratch folders for this module; the loop counts training
    steps, the pack's progress events are recorded, and the machine has MEMORY_BYTES free."""
    fp = comfy.folder_paths
    base = str(tmp_path_factory.mktemp("hardening_node"))
    ctx = Ctx("node", os.path.join(base, "input"), os.path.join(base, "temp"), os.path.join(base, "output"),
              shared_dirs["outside"], shared_dirs["allowed"], comfy=comfy, sd15=sd15, sdxl_paths=tiny_models,
              mark=shared_dirs["mark"])
    make_input(ctx.input, ctx.outside, ctx.allowed)
    ctx.loras, ctx.embeddings = make_models(base, hardening.lora_layers(sd15[0]), ctx.mark)
    os.makedirs(ctx.temp)
    os.makedirs(ctx.output)
    old = fp.get_input_directory(), fp.get_temp_directory(), fp.get_output_directory()
    loop, host, common = comfy.pack("trainer.loop"), comfy.pack("trainer.hosts.comfy"), comfy.pack("nodes.common")
    real_step, real_loss = loop.Loop._take_step, host.ComfyHost.denoising_loss

    def counted_step(self):
        ctx.steps += 1
        return real_step(self)

    def loss(self, *a, **kw):
        out = real_loss(self, *a, **kw)
        return out * float("nan") if ctx.nan_at is not None and ctx.steps >= ctx.nan_at else out

    def send_event(event, data):
        if event == common.EVENT:
            ctx.events.append(dict(data))

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ROOTS_ENV, ctx.allowed)
        mp.setenv(MEMORY_ENV, MEMORY_BYTES)
        mp.setattr(loop.Loop, "_take_step", counted_step)
        mp.setattr(host.ComfyHost, "denoising_loss", loss)
        mp.setattr(common, "send_event", send_event)
        fp.set_input_directory(ctx.input)
        fp.set_temp_directory(ctx.temp)
        fp.set_output_directory(ctx.output)
        for kind, d in (("loras", ctx.loras), ("embeddings", ctx.embeddings)):
            fp.add_model_folder_path(kind, d, is_default=True)
        try:
            yield ctx
        finally:
            fp.set_input_directory(old[0])
            fp.set_temp_directory(old[1])
            fp.set_output_directory(old[2])
            for kind, d in (("loras", ctx.loras), ("embeddings", ctx.embeddings)):
                fp.folder_names_and_paths[kind][0].remove(d)


@pytest.fixture(scope="module")
def server_ctx(shared_dirs, tmp_path_factory, tiny_models, sd15):
    """A server of its own: it must start with DOMAINSTUDIO_IMAGE_ROOTS and DOMAINSTUDIO_MEMORY_BYTES
    set, and with the weight files in its models folders."""
    from comfyui_domainstudio.testing.comfy_server import ComfyServer

    base = str(tmp_path_factory.mktemp("hardening_server"))
    srv = ComfyServer(comfy_dir(), base, REPO, {
        "checkpoints": os.path.dirname(tiny_models["sd15"]),
        "diffusion_models": os.path.dirname(tiny_models["sdxl_unet"]),
    }, extra_packs={"ds_test_nodes": os.path.join(TESTS, "comfy_test_nodes")},
        env={ROOTS_ENV: shared_dirs["allowed"], MEMORY_ENV: MEMORY_BYTES})
    ctx = Ctx("server", os.path.join(base, "input"), os.path.join(base, "temp"), os.path.join(base, "output"),
              shared_dirs["outside"], shared_dirs["allowed"], server=srv,
              code_paths=(REPO, comfy_dir(), os.path.join(base, "packs")), mark=shared_dirs["mark"])
    make_input(ctx.input, ctx.outside, ctx.allowed)
    ctx.loras, ctx.embeddings = make_models(base, hardening.lora_layers(sd15[0]), ctx.mark)
    try:
        srv.start()
        yield ctx
    finally:
        srv.stop()


# ------------------------------------------------------------------ runners


def _files(dirs) -> set[str]:
    out = set()
    for d in dirs:
        for root, _, names in os.walk(d):
            out.update(os.path.join(root, n) for n in names if n != hardening.FILLER)  # the test's own
    return out


def _user_strings(row: Row, ctx: Ctx) -> list[str]:
    """The user's own strings as they may be echoed (raw, unquoted, escaped, truncated, JSON)."""
    out = []
    for v in ctx.fmt(row.inputs).values():
        if not isinstance(v, str) or not v:
            continue
        clean = v.strip().strip('"').strip("'").strip()
        cut = clean if len(clean) <= 200 else clean[:200] + "…"
        shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
        for s in (v, clean, shown):
            out += [s, json.dumps(s)[1:-1]]
    return sorted({s for s in out if s}, key=len, reverse=True)


def _scrub(text: str, row: Row, ctx: Ctx) -> str:
    for s in _user_strings(row, ctx):
        text = text.replace(s, "<user input>")
    return text


def _assert_nothing_revealed(text: str, row: Row, ctx: Ctx, where: str, skip_code_paths=False) -> None:
    text = _scrub(text, row, ctx)
    for frag in ctx.fmt(row.forbid):
        if skip_code_paths and any(frag in p for p in ctx.code_paths):
            continue
        assert frag not in text, f"{row.id} [{ctx.surface}]: {where} reveals {frag!r}:\n{text}"


def _assert_files(row: Row, ctx: Ctx, before: set[str]) -> None:
    new = _files(ctx.fmt(row.no_new_files_in)) - before
    assert not new, f"{row.id} [{ctx.surface}]: files written: {sorted(new)}"
    for pattern in ctx.fmt(row.must_not_exist):
        assert not glob.glob(pattern), f"{row.id} [{ctx.surface}]: {pattern} exists"


def run_node(row: Row, ctx: Ctx) -> str | None:
    """Run a row on the in-process node; returns the error message (None on success)."""
    cls = ctx.comfy.node(row.node)
    inputs = ctx.fmt(row.inputs)
    before = _files(ctx.fmt(row.no_new_files_in))
    error = None
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        try:
            out = cls.execute(**inputs)
        except Exception as e:  # noqa: BLE001 - what ComfyUI would report
            error = str(e)
    _assert_files(row, ctx, before)
    if row.expect is None:
        assert error is None, f"{row.id}: {error}"
        result = out.result
        if row.expect_images is not None:
            assert result[1].shape[0] == row.expect_images, result[1].shape
        for item in result:
            if isinstance(item, str):
                _assert_nothing_revealed(item, row, ctx, "an output string")
        if row.check:
            row.check(ctx, result[0])
    else:
        assert error is not None, f"{row.id}: expected an error containing {row.expect!r}, got success"
        assert ctx.fmt(row.expect) in error, f"{row.id}: {error}"
        _assert_nothing_revealed(error, row, ctx, "the error")
    # The host is fine afterwards: the node still works.
    with torch.inference_mode():
        alive = ctx.comfy.node(IMAGE_SET).execute(resolution=64, flip=False, images=torch.rand(1, 64, 64, 3))
    assert alive.result[1].shape == (1, 64, 64, 3)
    return error


def _view(srv, filename: str, type_: str, subfolder: str = "") -> int:
    q = {"filename": filename, "type": type_}
    if subfolder:
        q["subfolder"] = subfolder
    return srv.get_raw("/view?" + urllib.parse.urlencode(q))[0]


def run_server(row: Row, ctx: Ctx) -> str | None:
    """Queue `node → PreviewImage` on the real server; returns the error message (None on success)."""
    srv = ctx.server
    workflow = {"1": {"class_type": row.node, "inputs": ctx.fmt(row.inputs)}}
    if row.preview_slot is not None:
        workflow["2"] = {"class_type": "PreviewImage", "inputs": {"images": ["1", row.preview_slot]}}
    before = _files(ctx.fmt(row.no_new_files_in))
    payload: Any
    try:
        prompt_id, msgs = srv.run(workflow, timeout=120)
    except AssertionError as e:  # refused at validation: POST /prompt -> 400 with the reason
        assert "POST /prompt -> 400" in str(e), str(e)
        prompt_id, msgs = None, []
        error, payload = str(e), str(e)
    else:
        errors = [m["data"] for m in msgs if m["type"] == "execution_error"]
        error = errors[0]["exception_message"] if errors else None
        payload = errors[0] if errors else None
    _assert_files(row, ctx, before)
    if row.expect is None:
        assert error is None, f"{row.id}: {error}"
        if row.preview_slot is not None:
            images = srv.outputs(prompt_id)["2"]["images"]
            if row.expect_images is not None:
                assert len(images) == row.expect_images
            for im in images:  # positive control for the /view probes below
                assert _view(srv, im["filename"], im["type"], im.get("subfolder", "")) == 200
    else:
        assert error is not None, f"{row.id}: expected an error containing {row.expect!r}, got success"
        assert ctx.fmt(row.expect) in error, f"{row.id}: {error}"
        if isinstance(payload, dict):
            tb = payload.get("traceback", [])
            rest = {k: v for k, v in payload.items() if k != "traceback"}
            _assert_nothing_revealed(json.dumps(rest, ensure_ascii=False), row, ctx, "the execution_error")
            _assert_nothing_revealed("\n".join(tb), row, ctx, "the traceback", skip_code_paths=True)
        else:
            _assert_nothing_revealed(payload, row, ctx, "the validation error")
        if prompt_id is not None:
            assert not srv.outputs(prompt_id).get("2"), "a preview was produced"
    # GET /view cannot serve the outside images, whatever the folder names.
    rel = os.path.relpath(ctx.outside, ctx.input)
    for type_ in ("input", "temp", "output"):
        assert _view(srv, "o1.png", type_, rel) != 200
        assert _view(srv, os.path.join(rel, "o1.png"), type_) != 200
        assert _view(srv, os.path.join(ctx.outside, "o1.png"), type_) != 200
    # The server is alive and still runs prompts.
    assert srv.proc.poll() is None
    assert srv.get("/system_stats")
    return error


# ------------------------------------------------------------------ runners: trainers and Load Weights


def _expects(value) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value or ())


def _visible(run: Run, ctx: Ctx) -> str:
    """What a client is shown besides an error: the node's text output and the final event's
    message. Lines that are a saved file's own path are left out here: that they are server paths
    is test_saved_output_names_no_server_path's (expected-to-fail) business."""
    folders = (ctx.loras + os.sep, ctx.embeddings + os.sep)
    lines = [ln for ln in run.text.splitlines() if not (ln.startswith(folders) and os.path.exists(ln))]
    return "\n".join(lines + [run.final.get("message", "")])


def _check_run(row: Row, ctx: Ctx, run: Run, before: set[str]) -> None:
    """The checks every trainer / Load Weights row gets, on either surface (faults still in place)."""
    where = f"{row.id} [{ctx.surface}]"
    if row.cancel_at is not None:
        assert run.interrupted, f"{where}: not interrupted ({run.error})"
        # it stops within a step: at most one more step is reported after Cancel
        pressed = run.cancel_value
        assert pressed is not None and pressed <= run.progress[-1] <= pressed + 1, (where, run.progress)
    elif row.expect is not None:
        expect = row.expect_server if ctx.surface == "server" and row.expect_server else row.expect
        assert run.error is not None, f"{where}: expected an error containing {expect!r}, got success"
        for frag in _expects(ctx.fmt(expect)):
            assert frag in run.error, f"{where}: {frag!r} not in the error:\n{run.error}"
        if ctx.surface == "node":
            _assert_nothing_revealed(run.error, row, ctx, "the error")
    else:
        assert run.error is None and not run.interrupted, f"{where}: {run.error}"
        shown = _visible(run, ctx)
        final = run.final.get("message", "")
        for frag in ctx.fmt(row.message):
            if row.node == WEIGHTS or SAVE_FAILED[0] in row.message:  # the text output ...
                assert frag in run.text, f"{where}: {frag!r} not in the text output:\n{run.text}"
            if row.node != WEIGHTS:  # ... and the final domainstudio.progress event
                assert frag in final, f"{where}: {frag!r} not in the final progress message:\n{final}"
        _assert_nothing_revealed(shown, row, ctx, "the text output / final progress message")
    for e in run.events:
        _assert_nothing_revealed(json.dumps({k: e.get(k) for k in ("message", "text", "stage")}, ensure_ascii=False),
                                 row, ctx, "a domainstudio.progress event")
    if row.no_training:
        assert not run.progress, f"{where}: training progress was reported: {run.progress}"
        assert all(not e.get("step") for e in run.events), f"{where}: {run.events}"
        assert not run.steps, f"{where}: {run.steps} training steps ran"
    _assert_files(row, ctx, before)
    for pattern in ctx.fmt(row.must_exist):
        assert glob.glob(pattern), f"{where}: {pattern} does not exist"
    left = [f for f in run.new_files if hardening_temp(f)]
    assert not left, f"{where}: temporary files left: {left}"
    if row.verify:
        row.verify(ctx, run)


def hardening_temp(path: str) -> bool:
    return ".dstmp-" in os.path.basename(path)


def _faults(stack: contextlib.ExitStack, faults, ctx: Ctx, patch: bool) -> None:
    for kind, folder in faults:
        try:
            stack.enter_context(hardening.fault(kind, ctx.fmt(folder), patch=patch))
        except hardening.NotAvailable as e:
            pytest.skip(f"not made on this machine: {e}")


def _node_value(ctx: Ctx, v):
    if not isinstance(v, Src):
        return v
    if v.kind in ("model", "clip", "vae"):
        return ctx.sd15[("model", "clip", "vae").index(v.kind)]
    if v.kind in ("sdxl_model", "sdxl_clip"):
        if "sdxl" not in ctx.cache:
            from comfyui_domainstudio.testing import tiny_models as tm

            unet = ctx.comfy.nodes.UNETLoader().load_unet(os.path.basename(ctx.sdxl_paths["sdxl_unet"]), "default")[0]
            ctx.cache["sdxl"] = (unet, tm.tiny_sdxl_clip(3))
        return ctx.cache["sdxl"][0 if v.kind == "sdxl_model" else 1]
    if v.kind in ("images", "image_set"):
        folder, resolution = v.args
        with torch.inference_mode():
            out = ctx.comfy.node(IMAGE_SET).execute(resolution=resolution, flip=False, folder=folder).result
        return out[1] if v.kind == "images" else out[0]
    if v.kind == "empty":
        return ctx.comfy.nodes.EmptyImage().generate(*v.args, 0)[0]
    return TENSORS[v.args[0]]()


def _node_sample(ctx: Ctx, model, seed: int = 1) -> torch.Tensor:
    """Stock CLIPTextEncode -> EmptyLatentImage -> KSampler with `model` (tiny SD1.5 CLIP)."""
    nodes, clip = ctx.comfy.nodes, ctx.sd15[1]
    with torch.inference_mode():
        pos = nodes.CLIPTextEncode().encode(clip, "a photo of a house")[0]
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        return nodes.KSampler().sample(model, seed, 2, 5.0, "euler", "normal", pos, neg, latent)[0]["samples"]


def _node_use_outputs(row: Row, ctx: Ctx, run: Run) -> None:
    """The returned MODEL samples with stock KSampler; the delta saves with stock Save LoRA Weights."""
    slots = SLOTS[row.node]
    out = _node_sample(ctx, run.result[slots["model"]])
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    if "delta" in slots:
        from comfy_extras.nodes_train import SaveLoRA

        delta = run.result[slots["delta"]]
        assert delta and all(torch.isfinite(v).all() for v in delta.values())
        with torch.inference_mode():
            SaveLoRA.execute(lora=delta, prefix=f"loras/{row.id}")
        assert glob.glob(os.path.join(ctx.output, "loras", f"{row.id}_*.safetensors"))


def run_node_train(row: Row, ctx: Ctx) -> Run:
    """A trainer / Load Weights row on the in-process node, with a progress hook that does what the
    server's does (raise on Cancel, report) and presses Cancel or breaks a folder when asked."""
    import comfy.model_management as mm
    from comfy import utils as comfy_utils

    cls = ctx.comfy.node(row.node)
    inputs = {k: _node_value(ctx, v) for k, v in ctx.fmt(row.inputs).items() if v is not None}
    run = Run(cancel_at=row.cancel_at)
    ctx.steps, ctx.events[:] = 0, []
    with contextlib.ExitStack() as stack:
        _faults(stack, row.setup, ctx, patch=True)
        watched = ctx.fmt(FOLDERS)
        before_all, before = _files(watched), _files(ctx.fmt(row.no_new_files_in))
        during = list(row.during)

        def hook(value, total, preview, node_id=None):
            mm.throw_exception_if_processing_interrupted()  # as ComfyUI's server hook does
            run.progress.append(value)
            while during and value >= row.during_at:
                kind, folder = during.pop(0)
                stack.enter_context(hardening.fault(kind, ctx.fmt(folder), patch=True))
            if row.cancel_at is not None and value >= row.cancel_at and not run.cancel_sent:
                run.cancel_sent, run.cancel_value = True, value  # newer ComfyUI throttles the hook
                mm.interrupt_current_processing(True)  # what POST /interrupt does

        comfy_utils.set_progress_bar_global_hook(hook)
        ctx.nan_at = row.nan_at
        try:
            with torch.inference_mode():  # as ComfyUI's executor runs nodes
                try:
                    run.result = cls.execute(**inputs).result
                except mm.InterruptProcessingException:
                    run.interrupted = True
                except Exception as e:  # noqa: BLE001 - what ComfyUI would report
                    run.error = str(e)
        finally:
            comfy_utils.set_progress_bar_global_hook(None)
            mm.interrupt_current_processing(False)
            ctx.nan_at = None
        run.steps, run.events = ctx.steps, list(ctx.events)
        if run.result is not None:
            run.text = run.result[SLOTS[row.node]["text"]]
        run.new_files = _files(watched) - before_all
        _check_run(row, ctx, run, before)
    if row.returns:
        _node_use_outputs(row, ctx, run)
    with torch.inference_mode():  # the host is fine afterwards: a node still runs
        alive = ctx.comfy.node(IMAGE_SET).execute(resolution=64, flip=False, images=torch.rand(1, 64, 64, 3))
    assert alive.result[1].shape == (1, 64, 64, 3)
    return run


class Graph:
    """An API workflow under construction; Src values become links to the nodes that make them."""

    def __init__(self, ctx: Ctx):
        self.ctx, self.nodes, self.made = ctx, {}, {}

    def add(self, class_type: str, inputs: dict, id: str | None = None) -> str:
        id = id or str(100 + len(self.nodes))
        self.nodes[id] = {"class_type": class_type, "inputs": inputs}
        return id

    def _once(self, key, class_type: str, inputs: dict) -> str:
        if key not in self.made:
            self.made[key] = self.add(class_type, inputs)
        return self.made[key]

    def value(self, v):
        if not isinstance(v, Src):
            return v
        if v.kind in ("model", "clip", "vae"):
            ckpt = self._once("ckpt", "CheckpointLoaderSimple", {"ckpt_name": "tiny_sd15.safetensors"})
            return [ckpt, ("model", "clip", "vae").index(v.kind)]
        if v.kind == "sdxl_model":
            return [self._once("unet", "UNETLoader", {"unet_name": "tiny_sdxl_unet.safetensors",
                                                      "weight_dtype": "default"}), 0]
        if v.kind == "sdxl_clip":
            return [self._once("sdxl_clip", "DSTest_TinySDXLClip", {"seed": 3}), 0]
        if v.kind in ("images", "image_set"):
            folder, resolution = v.args
            node = self._once(("set", folder, resolution), IMAGE_SET,
                              {"folder": folder, "resolution": resolution, "flip": False})
            return [node, 1 if v.kind == "images" else 0]
        if v.kind == "empty":
            w, h, b = v.args
            return [self._once(("empty", *v.args), "EmptyImage", {"width": w, "height": h, "batch_size": b,
                                                                  "color": 0}), 0]
        raise AssertionError(f"{v} exists only on the node surface")


def _defaults(ctx: Ctx, class_type: str) -> dict:
    """Default values of a node's required widget inputs, as the server lists them (/object_info)."""
    key = ("object_info", class_type)
    if key not in ctx.cache:
        ctx.cache[key] = ctx.server.get(f"/object_info/{class_type}")[class_type]
    out = {}
    for name, spec in ctx.cache[key]["input"].get("required", {}).items():
        kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
        if isinstance(kind, list):
            out[name] = opts.get("default", kind[0] if kind else None)
        elif kind == "COMBO":
            out[name] = opts.get("default", (opts.get("options") or [None])[0])
        elif kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
            out[name] = opts.get("default")
    return out


def _server_alive(ctx: Ctx) -> None:
    """The server answers and runs a new prompt (a fresh one each time: nothing cached)."""
    srv = ctx.server
    assert srv.proc.poll() is None, srv.log()[-3000:]
    assert srv.get("/system_stats")
    ctx.cache["alive"] = n = ctx.cache.get("alive", 0) + 1
    prompt_id, _ = srv.run({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                                         "color": n}},
                            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}, timeout=120)
    assert srv.outputs(prompt_id)["2"]["images"]


def run_server_train(row: Row, ctx: Ctx) -> Run:
    """A trainer / Load Weights row on the real server: the node, its text output into stock
    Preview as Text, and (row.returns) its MODEL into stock KSampler and its delta into stock Save
    LoRA Weights. Cancel is POST /interrupt when the progress value arrives."""
    srv = ctx.server
    g = Graph(ctx)
    slots = SLOTS[row.node]
    inputs = {k: g.value(v) for k, v in ctx.fmt(row.inputs).items() if v is not None}
    g.add(row.node, {**_defaults(ctx, row.node), **inputs}, id="1")
    g.add("PreviewAny", {"source": ["1", slots["text"]]}, id="2")
    if row.returns:
        clip = g.value(CLIP)
        pos = g.add("CLIPTextEncode", {"clip": clip, "text": "a photo of a house"})
        neg = g.add("CLIPTextEncode", {"clip": clip, "text": ""})
        latent = g.add("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1})
        sampled = g.add("KSampler", {"model": ["1", slots["model"]], "positive": [pos, 0], "negative": [neg, 0],
                                     "latent_image": [latent, 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                     "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0})
        decoded = g.add("VAEDecode", {"samples": [sampled, 0], "vae": g.value(VAE)})
        g.add("PreviewImage", {"images": [decoded, 0]}, id="3")
        if "delta" in slots:
            g.add("SaveLoRA", {"lora": ["1", slots["delta"]], "prefix": f"loras/{row.id}"}, id="4")
    run = Run(cancel_at=row.cancel_at)
    with contextlib.ExitStack() as stack:
        _faults(stack, row.setup, ctx, patch=False)
        during = list(row.during)

        def on_message(msg):
            data = msg.get("data") or {}
            if msg["type"] == "progress" and data.get("node") == "1":
                run.progress.append(data["value"])
                while during and data["value"] >= row.during_at:  # the run goes on meanwhile: rows
                    _faults(stack, [during.pop(0)], ctx, patch=False)  # leave it a few steps
                if row.cancel_at is not None and data["value"] >= row.cancel_at and not run.cancel_sent:
                    run.cancel_sent, run.cancel_value = True, data["value"]  # throttled on newer ComfyUI
                    srv.post("/interrupt", {})
            elif msg["type"] == "domainstudio.progress":
                run.events.append(data)

        watched = ctx.fmt(FOLDERS)
        before_all, before = _files(watched), _files(ctx.fmt(row.no_new_files_in))
        payload: Any = None
        outputs: dict = {}
        try:
            prompt_id, msgs = srv.run(g.nodes, timeout=600, on_message=on_message)
        except AssertionError as e:  # refused at validation: POST /prompt -> 400 with the reason
            assert "POST /prompt -> 400" in str(e), str(e)
            run.error = payload = str(e)
        else:
            errors = [m["data"] for m in msgs if m["type"] == "execution_error"]
            if errors:
                payload, run.error = errors[0], errors[0]["exception_message"]
            run.interrupted = any(m["type"] == "execution_interrupted" for m in msgs)
            if not errors and not run.interrupted:
                outputs = srv.outputs(prompt_id)
                run.text = "\n".join(outputs.get("2", {}).get("text", []))
        run.new_files = _files(watched) - before_all
        _check_run(row, ctx, run, before)
        if isinstance(payload, dict):
            rest = {k: v for k, v in payload.items() if k != "traceback"}
            _assert_nothing_revealed(json.dumps(rest, ensure_ascii=False), row, ctx, "the execution_error")
            _assert_nothing_revealed("\n".join(payload.get("traceback", [])), row, ctx, "the traceback",
                                     skip_code_paths=True)
        elif payload is not None:
            _assert_nothing_revealed(payload, row, ctx, "the validation error")
    if SAVE_FAILED[0] in row.message:  # the server's log says it too
        assert SAVE_FAILED[0] in srv.log(), f"{row.id}: the save failure is not in the server log"
    if row.returns:
        assert outputs.get("3", {}).get("images"), f"{row.id}: stock KSampler made no image from the MODEL"
        if "delta" in slots:
            assert glob.glob(os.path.join(ctx.output, "loras", f"{row.id}_*.safetensors")), \
                f"{row.id}: stock Save LoRA Weights wrote nothing"
    _server_alive(ctx)
    return run


def _runner(surface: str, row: Row):
    if row.node == IMAGE_SET:
        return {"node": run_node, "server": run_server}[surface]
    return {"node": run_node_train, "server": run_server_train}[surface]


RUNNERS = {"node": run_node, "server": run_server}


def _rows(surface: str) -> list:
    return [pytest.param(r, id=r.id) for r in ROWS if surface in r.surfaces]


def _same_refusal(messages: dict[str, str]) -> None:
    """Every refused row gives the very same text once the user's string is taken out."""
    texts = {}
    for row_id, (row, ctx, msg) in messages.items():
        texts[row_id] = _scrub(msg, row, ctx)
    distinct = set(texts.values())
    assert len(distinct) == 1, json.dumps(texts, indent=1, ensure_ascii=False)


# ------------------------------------------------------------------ tests


def test_rows_are_well_formed():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)), "row ids must be unique"
    for r in ROWS:
        assert r.surfaces and set(r.surfaces) <= set(RUNNERS), r.id
        assert not r.refused or r.expect == REFUSAL, r.id
        assert (r.expect is not None or r.expect_images is not None or r.check or r.returns or r.message
                or r.verify), f"{r.id}: a success row checks something"
        assert r.nan_at is None or r.surfaces == ("node",), f"{r.id}: a patched host: node surface only"
        assert all(kind in hardening.FAULTS for kind, _ in r.setup + r.during), r.id


@pytest.mark.parametrize("row", _rows("node"))
def test_node(row, node_ctx):
    _runner("node", row)(row, node_ctx)


@pytest.mark.e2e
@pytest.mark.parametrize("row", _rows("server"))
def test_server(row, server_ctx):
    _runner("server", row)(row, server_ctx)


def test_node_refusals_are_identical(node_ctx):
    got = {r.id: (r, node_ctx, run_node(r, node_ctx)) for r in ROWS if r.refused and "node" in r.surfaces}
    assert len(got) >= 10
    _same_refusal(got)


@pytest.mark.e2e
def test_server_refusals_are_identical(server_ctx):
    got = {r.id: (r, server_ctx, run_server(r, server_ctx)) for r in ROWS if r.refused and "server" in r.surfaces}
    assert len(got) >= 10
    _same_refusal(got)


def test_env_var_is_read_per_run_and_only_absolute_entries_count(node_ctx, monkeypatch):
    """Without the variable the allowed folder is refused like any other; relative entries are ignored."""
    cls = node_ctx.comfy.node(IMAGE_SET)
    monkeypatch.delenv(ROOTS_ENV)
    with pytest.raises(ValueError, match=REFUSAL):
        cls.execute(resolution=64, flip=False, folder=node_ctx.allowed)
    monkeypatch.setenv(ROOTS_ENV, os.pathsep.join(["relative/dir", node_ctx.allowed]))
    assert cls.execute(resolution=64, flip=False, folder=node_ctx.allowed).result[1].shape[0] == 2
    monkeypatch.setenv(ROOTS_ENV, "relative/dir")
    with pytest.raises(ValueError, match=REFUSAL):
        cls.execute(resolution=64, flip=False, folder="../allowed")  # relative names: input dir only


def test_node_captions_input(node_ctx):
    cls = node_ctx.comfy.node(IMAGE_SET)
    out = cls.execute(resolution=64, flip=True, folder="my_style", images=torch.rand(2, 64, 64, 3),
                      captions="first input\n\nfor b.png\n\n")
    image_set = out.result[0]
    assert image_set.names[:4] == ["input[0]", "input[1]", "a.png", "b.png"]
    assert image_set.captions == ["first input", None, "a red square, flat", "for b.png"] * 2
    assert "captions for 6 of 8" in out.result[2]


# ------------------------------------------------------------------ crashes, repeated runs, file modes


def _saved_mode_ok(path: str) -> None:
    mode = os.stat(path).st_mode & 0o777
    assert mode == 0o666 & ~hardening.umask(), f"{os.path.basename(path)}: mode {oct(mode)}"


def _combo(spec) -> list[str]:
    """The options of a combo input as /object_info lists it (either host's layout)."""
    if isinstance(spec[0], list):
        return spec[0]
    return list((spec[1] if len(spec) > 1 else {}).get("options", []))


def test_node_crash_during_save_leaves_nothing_listable(node_ctx):
    """A process killed while save_delta writes leaves only a hidden temporary file that no model list
    shows, and the pack deletes it when ComfyUI loads it."""
    import asyncio

    from comfyui_domainstudio import comfy_entrypoint

    ctx = node_ctx
    target = os.path.join(ctx.loras, "crashed_00001.safetensors")
    left = hardening.kill_during_save(REPO, target)
    assert left and all(os.path.getsize(p) > 0 for p in left), left  # it really died half-way
    assert not os.path.exists(target)
    listed = ctx.comfy.folder_paths.get_filename_list("loras")
    assert not [n for n in listed if "crashed" in n or hardening_temp(n)], listed
    options = ctx.comfy.pack("nodes.common").weight_file_options()
    assert not [o for o in options if "crashed" in o], options

    async def load():
        return await (await comfy_entrypoint()).get_node_list()

    assert asyncio.run(load())
    assert not [p for p in left if os.path.exists(p)]


@pytest.mark.e2e
def test_server_crash_during_save_leaves_nothing_listable_and_restart_clears_it(server_ctx):
    ctx, srv = server_ctx, server_ctx.server
    target = os.path.join(ctx.loras, "crashed_00001.safetensors")
    left = hardening.kill_during_save(REPO, target)
    assert left and not os.path.exists(target)
    assert not [n for n in srv.get("/models/loras") if "crashed" in n or hardening_temp(n)]
    lora_loader = srv.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"]
    ours = srv.get(f"/object_info/{WEIGHTS}")[WEIGHTS]["input"]["required"]["file"]
    for options in (_combo(lora_loader), _combo(ours)):
        assert "good.safetensors" in " ".join(options)  # positive control: the list is the real one
        assert not [o for o in options if "crashed" in o or hardening_temp(o)], options
    srv.stop()
    srv.start()
    assert not [p for p in left if os.path.exists(p)], "the pack did not remove the stale temporary file"
    _server_alive(ctx)


def test_non_finite_delta_is_never_written(tmp_path):
    from comfyui_domainstudio.trainer import deltas

    bad = {"nan": {"lora_unet_x.diff": torch.tensor([[1.0, float("nan")]])},
           "inf": {"lora_unet_x.diff": torch.tensor([[float("inf"), 0.0]])},
           "fp16 overflow": {"lora_unet_x.diff": torch.tensor([[1e6, 0.0]])}}
    for what, tensors in bad.items():
        with pytest.raises(deltas.WeightFileError, match="non-finite|overflows"):
            deltas.save_delta(str(tmp_path / "d.safetensors"), tensors, {}, dtype="fp16")
    assert os.listdir(tmp_path) == []


B2B_RUNS = 4
# RSS growth allowed from the end of run 2 to the end of run 4 (measured here: 0-7 MiB on either
# surface); a run that leaked its optimizer, activations or a model copy would exceed it.
B2B_GROWTH = 64 * 1024 ** 2


def test_node_back_to_back_runs_leave_the_model_and_memory_alone(node_ctx):
    import gc

    ctx = node_ctx
    model = ctx.sd15[0]
    before = _node_sample(ctx, model)
    cls, rss, saved = ctx.comfy.node(TRAIN), [], []
    inputs = {k: _node_value(ctx, v) for k, v in DOMAIN.items()}
    for i in range(B2B_RUNS):
        with torch.inference_mode():
            out = cls.execute(**{**inputs, "train_seed": i, "steps": 2, "save_name": "hd_b2b"}).result
        saved += [node_ctx.comfy.folder_paths.get_full_path("loras", ln.partition("/")[2])
                  for ln in out[3].splitlines() if ln.endswith(".safetensors")]
        del out
        gc.collect()
        rss.append(hardening.rss_bytes())
    assert torch.equal(before, _node_sample(ctx, model)), "the input MODEL changed"
    assert rss[-1] - rss[1] < B2B_GROWTH, [f"{r / 2**20:.0f} MiB" for r in rss]
    assert len(saved) == B2B_RUNS
    for p in saved:
        _saved_mode_ok(p)


def _latent_file(ctx: Ctx, item: dict) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(os.path.join(ctx.output, item.get("subfolder", ""), item["filename"]))["latent_tensor"]


@pytest.mark.e2e
def test_server_back_to_back_runs_leave_the_model_and_memory_alone(server_ctx):
    """Sample the loaded MODEL, queue 4 trainings of it at once, sample it again: the same latents
    (the second sample recomputed, the loader's MODEL the cached one), and the server's RSS bounded."""
    ctx, srv = server_ctx, server_ctx.server

    def sample(text: str) -> tuple[torch.Tensor, list[str]]:
        g = Graph(ctx)
        clip = g.value(CLIP)
        pos = g.add("CLIPTextEncode", {"clip": clip, "text": text})
        neg = g.add("CLIPTextEncode", {"clip": clip, "text": ""})
        latent = g.add("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1})
        g.add("KSampler", {"model": g.value(MODEL), "positive": [pos, 0], "negative": [neg, 0],
                           "latent_image": [latent, 0], "seed": 5, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
                           "scheduler": "normal", "denoise": 1.0}, id="7")
        g.add("SaveLatent", {"samples": ["7", 0], "filename_prefix": "latents/hd_b2b"}, id="8")
        prompt_id, msgs = srv.run(g.nodes, timeout=300)
        cached = [n for m in msgs if m["type"] == "execution_cached" for n in m["data"].get("nodes", [])]
        return _latent_file(ctx, srv.outputs(prompt_id)["8"]["latents"][0]), cached

    before, _ = sample("a photo of a house")
    g = Graph(ctx)
    inputs = {k: g.value(v) for k, v in DOMAIN.items()}
    g.add(TRAIN, {**_defaults(ctx, TRAIN), **inputs, "steps": 2, "save_name": "hd_b2b"}, id="1")
    g.add("PreviewAny", {"source": ["1", 3]}, id="2")
    ws, client_id = _client(srv)
    try:
        ids = []
        for i in range(B2B_RUNS):  # queued at once
            wf = json.loads(json.dumps(g.nodes))
            wf["1"]["inputs"]["train_seed"] = 100 + i
            ids.append(srv.post("/prompt", {"prompt": wf, "client_id": client_id})["prompt_id"])
        rss, done = [], set()
        while len(done) < B2B_RUNS:
            raw = ws.recv()
            if isinstance(raw, bytes):
                continue
            msg = json.loads(raw)
            data = msg.get("data") or {}
            assert msg["type"] != "execution_error", data.get("exception_message")
            if msg["type"] == "execution_success" and data.get("prompt_id") in ids:
                done.add(data["prompt_id"])
                rss.append(hardening.rss_bytes(srv.proc.pid))
    finally:
        ws.close()
    # A trailing space tokenizes the same: the same conditioning, but a new cache key, so the
    # KSampler runs again while the checkpoint loader's MODEL (the one trained on) stays cached.
    after, cached = sample("a photo of a house ")
    assert "7" not in cached and any(n for n in cached), cached
    assert torch.equal(before, after), "the loaded MODEL changed after 4 trainings"
    assert rss[-1] - rss[1] < B2B_GROWTH, [f"{r / 2**20:.0f} MiB" for r in rss]
    written = sorted(glob.glob(os.path.join(ctx.loras, "hd_b2b_*.safetensors")))
    assert len(written) == B2B_RUNS, written
    for p in written:
        _saved_mode_ok(p)


def _client(srv):
    """A websocket to the server and its client id (to queue several prompts and follow them)."""
    import uuid

    import websocket

    client_id = uuid.uuid4().hex
    return websocket.create_connection(f"ws://127.0.0.1:{srv.port}/ws?clientId={client_id}", timeout=600), client_id


def test_saved_output_names_no_server_path(node_ctx):
    inputs = {k: _node_value(node_ctx, v) for k, v in DOMAIN.items()}
    with torch.inference_mode():
        out = node_ctx.comfy.node(TRAIN).execute(**{**inputs, "save_name": "hd_paths"}).result
    assert out[3].strip() and node_ctx.models not in out[3], out[3]
    assert out[3].startswith("loras/hd_paths_"), out[3]
