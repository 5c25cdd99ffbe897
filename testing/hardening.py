"""Scaffolding of tests/test_hardening.py: broken model folders, hostile weight files, a save killed
half-way, and the memory of a process. Nothing here asserts; the test module decides what must happen.

Folder faults (`fault(kind, folder)`), the same for the in-process node and a real server because
they change the folder itself, not the code that writes to it:

  full          the folder is an 8 MiB tmpfs that is completely full (the pre-training probe fails)
  tmpfs         the folder is an empty 8 MiB tmpfs (room for a tiny model's files) ...
  fill          ... that fills up completely, made while a run trains: the disk is full at save time
  readonly      a read-only bind mount of the folder (root ignores permission bits); as non-root,
                chmod 0555
  file          a regular FILE where the folder should be (the folder is moved aside meanwhile)

Mounting needs root with CAP_SYS_ADMIN. Where it is not allowed, `fault(..., patch=True)` (the
in-process surface) makes the pack's own writes fail the same way with the errno the file system
would give; a server surface cannot be patched and the row is skipped with the reason (a skip is
reported, never counted as a pass). DS_HARDENING_NO_MOUNT=1 forces the fallback (to test it).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import torch

PAGE = 4096
TMPFS_BYTES = 8 * 1024 * 1024
FILLER = ".ds_filler"  # hidden, no model extension: no model list shows it
FAULTS = ("full", "tmpfs", "fill", "readonly", "file")


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@functools.lru_cache(maxsize=1)
def can_mount() -> bool:
    """Whether this process may mount a tmpfs and a read-only bind mount (tried once, undone)."""
    if os.environ.get("DS_HARDENING_NO_MOUNT") or not is_root() or not shutil.which("mount"):
        return False
    d = tempfile.mkdtemp(prefix="ds-mount-probe-")
    try:
        if _sh("mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", d) != 0:
            return False
        _umount(d)
        if _sh("mount", "--bind", d, d) != 0:
            return False
        ok = _sh("mount", "-o", "remount,bind,ro", d) == 0
        _umount(d)
        return ok
    finally:
        os.rmdir(d)


def _sh(*cmd: str) -> int:
    return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def _umount(d: str) -> None:
    for _ in range(20):
        if _sh("umount", d) == 0:
            return
        time.sleep(0.1)
    _sh("umount", "-l", d)


def mechanism(kind: str) -> str | None:
    """How `kind` is made here without patching: 'mount', 'chmod', 'rename', or None (only a patch can)."""
    if kind == "file":
        return "rename"
    if can_mount():
        return "mount"
    if kind == "readonly" and not is_root():
        return "chmod"
    return None


def _fill(folder: str, free_pages: int) -> None:
    """Fill a tmpfs completely (a hidden file), then give `free_pages` pages back."""
    path = os.path.join(folder, FILLER)
    chunk = b"\0" * PAGE
    size = 0
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
                size += PAGE
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
    if free_pages:
        os.truncate(path, max(0, size - free_pages * PAGE))


@contextlib.contextmanager
def fault(kind: str, folder: str, patch: bool = False) -> Iterator[str]:
    """Make `folder` broken as `kind` (see the module docstring) for the duration; yields the mechanism.
    patch=True allows the in-process fallback when no real mechanism exists here."""
    assert kind in FAULTS, kind
    how = mechanism(kind)
    if how is None:
        if not patch:
            raise NotAvailable(f"fault {kind!r} needs mount (root with CAP_SYS_ADMIN) on a real server")
        with _patched(kind, folder):
            yield "patch"
        return
    os.makedirs(folder, exist_ok=True)
    if how == "rename":
        away = folder + ".away"
        os.rename(folder, away)
        try:
            with open(folder, "w") as f:
                f.write("not a folder\n")
            yield how
        finally:
            os.unlink(folder)
            os.rename(away, folder)
    elif how == "chmod":
        mode = os.stat(folder).st_mode
        os.chmod(folder, 0o555)
        try:
            yield how
        finally:
            os.chmod(folder, mode)
    elif kind == "readonly":
        if _sh("mount", "--bind", folder, folder) != 0:
            raise RuntimeError(f"bind mount of {folder} failed")
        try:
            if _sh("mount", "-o", "remount,bind,ro", folder) != 0:
                raise RuntimeError(f"read-only remount of {folder} failed")
            yield how
        finally:
            _umount(folder)
    elif kind == "fill":
        if not os.path.ismount(folder):
            raise RuntimeError(f"fill: {folder} is not a tmpfs of ours (make it with the 'tmpfs' fault first)")
        _fill(folder, 0)
        try:
            yield how
        finally:
            os.unlink(os.path.join(folder, FILLER))
    else:
        if _sh("mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", folder) != 0:
            raise RuntimeError(f"tmpfs mount on {folder} failed")
        try:
            if kind == "full":
                _fill(folder, 0)
            yield how
        finally:
            _umount(folder)


class NotAvailable(RuntimeError):
    """A fault this machine cannot make for a server (no mount)."""


@contextlib.contextmanager
def _patched(kind: str, folder: str):
    """In-process stand-in: the pack's writes into `folder` fail as the file system would make them."""
    import safetensors.torch

    real_mkstemp, real_save = tempfile.mkstemp, safetensors.torch.save_file
    target = os.path.realpath(folder)
    if kind == "tmpfs":  # nothing to stand in for: the folder keeps working until 'fill'
        yield
        return
    code = {"full": errno.ENOSPC, "fill": errno.ENOSPC, "readonly": errno.EROFS, "file": errno.EEXIST}[kind]

    def inside(d) -> bool:
        return d is not None and os.path.realpath(d) == target

    def mkstemp(*a, **kw):
        if inside(kw.get("dir")) and kind in ("full", "readonly"):
            raise OSError(code, os.strerror(code))
        return real_mkstemp(*a, **kw)

    def save_file(tensors, filename, *a, **kw):
        if inside(os.path.dirname(str(filename))):
            with open(filename, "wb") as f:  # a partial file, as a real full disk leaves one
                f.write(b"\0" * PAGE)
            raise OSError(code, os.strerror(code))
        return real_save(tensors, filename, *a, **kw)

    real_usage = shutil.disk_usage

    def disk_usage(path):
        usage = real_usage(path)
        if inside(path) and code == errno.ENOSPC:
            return type(usage)(usage.total, usage.total, 0)
        return usage

    tempfile.mkstemp, safetensors.torch.save_file, shutil.disk_usage = mkstemp, save_file, disk_usage
    try:
        yield
    finally:
        tempfile.mkstemp, safetensors.torch.save_file, shutil.disk_usage = real_mkstemp, real_save, real_usage


# ------------------------------------------------------------------ hostile weight files


class _Evil:
    """Unpickling this creates the file named by DS_EVIL_MARK (what a malicious .pt could do)."""

    def __init__(self, mark: str):
        self.mark = mark

    def __reduce__(self):
        return (open, (self.mark, "w"))


def _safetensors_raw(path: str, header: dict, data: bytes = b"", declared: int | None = None) -> None:
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", declared if declared is not None else len(raw)))
        f.write(raw)
        f.write(data)


def lora_layers(model) -> dict[str, tuple[int, ...]]:
    """kohya name -> weight shape of the attention projections of a ComfyUI MODEL (for real-looking files)."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    state = model.model.state_dict()
    out = {}
    for k, target in sorted(key_map.items()):
        target = target[0] if isinstance(target, tuple) else target
        if k.startswith("lora_unet_") and "attn" in k and target in state and state[target].ndim == 2:
            out[k] = tuple(state[target].shape)
    return out


def _lora(layers: dict[str, tuple[int, ...]], rank: int = 2, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, (o, i) in layers.items():
        out[f"{name}.lora_up.weight"] = torch.randn(o, rank, generator=g) * scale
        out[f"{name}.lora_down.weight"] = torch.randn(rank, i, generator=g) * scale
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def make_weight_files(loras: str, embeddings: str, layers: dict[str, tuple[int, ...]], mark: str) -> None:
    """Good and hostile files in a models/loras and a models/embeddings folder (the rows of
    tests/test_hardening.py name them). `layers`: lora_layers(MODEL) of the model the good files
    fit. Unpickling evil.pt or evil_emb.pt would create `mark`."""
    from safetensors.torch import save_file

    os.makedirs(loras, exist_ok=True)
    os.makedirs(embeddings, exist_ok=True)
    three = dict(list(layers.items())[:3])
    good = _lora(three)
    save_file(good, os.path.join(loras, "good.safetensors"))
    nan = dict(good)
    first = next(iter(good))
    nan[first] = nan[first].clone()
    nan[first][0, 0] = float("nan")
    save_file(nan, os.path.join(loras, "nan.safetensors"))
    inf = dict(good)
    inf[first] = inf[first].clone()
    inf[first][0, 0] = float("inf")
    save_file(inf, os.path.join(loras, "inf.safetensors"))
    # two of three layers wrong: one up too tall, one down too wide
    wrong = dict(good)
    (n1, (o1, _)), (n2, (_, i2)) = list(three.items())[:2]
    wrong[f"{n1}.lora_up.weight"] = torch.zeros(o1 + 7, 2)
    wrong[f"{n2}.lora_down.weight"] = torch.zeros(2, i2 + 5)
    save_file(wrong, os.path.join(loras, "wrong_shapes.safetensors"))
    save_file(good, os.path.join(loras, "sdxl_made.safetensors"),
              metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                        "ss_base_model_version": "sdxl_base_v1-0"})
    other = {k.replace("lora_unet_", "lora_unet_output_blocks_8_1_transformer_blocks_9_"): v for k, v in good.items()}
    save_file(other, os.path.join(loras, "other_arch.safetensors"))
    torch.save(good, os.path.join(loras, "pickle_renamed.safetensors"))  # a pickle (zip) under a safe name
    with open(os.path.join(loras, "evil.pt"), "wb") as f:
        pickle.dump({"x": _Evil(mark)}, f)
    with open(os.path.join(embeddings, "evil_emb.pt"), "wb") as f:
        pickle.dump({"string_to_param": {"*": _Evil(mark)}}, f)
    # header length 100 MB + 1 (safetensors' limit is 100 MB): a sparse file, nothing read
    path = os.path.join(loras, "huge_header.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 100_000_001))
    os.truncate(path, 100_000_001 + 8)
    _safetensors_raw(os.path.join(loras, "absurd_shape.safetensors"),
                     {"lora_unet_x.lora_up.weight": {"dtype": "F16", "shape": [2**31, 2**31], "data_offsets": [0, 8]}},
                     b"\0" * 8)
    _safetensors_raw(os.path.join(loras, "absurd_offsets.safetensors"),
                     {"lora_unet_x.lora_up.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 2**62]}},
                     b"\0" * 8)
    open(os.path.join(loras, "empty.safetensors"), "wb").close()
    with open(os.path.join(loras, "corrupt.safetensors"), "wb") as f:
        f.write(os.urandom(4096))
    data = open(os.path.join(loras, "good.safetensors"), "rb").read()
    with open(os.path.join(loras, "truncated.safetensors"), "wb") as f:
        f.write(data[: len(data) // 2])
    save_file({"clip_l": torch.full((1, 768), float("nan"))}, os.path.join(embeddings, "nan_emb.safetensors"))
    save_file({"clip_l": torch.randn(1, 1024)}, os.path.join(embeddings, "wide_emb.safetensors"))
    with open(os.path.join(embeddings, "corrupt_emb.safetensors"), "wb") as f:
        f.write(b"{not json" * 10)


# ------------------------------------------------------------------ a save killed half-way

_SLOW_SAVE = r"""
import os, runpy, sys, time
runpy.run_path(os.path.join(sys.argv[1], "__init__.py"))
import safetensors.torch, torch
from comfyui_domainstudio.trainer import deltas

def slow(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\0" * 65536)
        f.flush()
        os.fsync(f.fileno())
        print("WRITING", flush=True)
        time.sleep(600)

safetensors.torch.save_file = slow
deltas.save_delta(sys.argv[2], {"lora_unet_x.diff": torch.ones(4, 4)}, {}, dtype="fp16")
"""


def kill_during_save(repo: str, path: str, timeout: float = 120.0) -> list[str]:
    """Run trainer.deltas.save_delta(path) in a child process whose writer stalls half-way, SIGKILL
    it there, and return the temporary files it left beside `path`."""
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, repo, path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + timeout
        line = ""
        while time.time() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            if line.strip() == "WRITING":
                break
        if line.strip() != "WRITING":
            raise RuntimeError(f"the saving child never started writing: {proc.stderr.read()[-2000:]}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    folder = os.path.dirname(path)
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if ".dstmp-" in n)


# ------------------------------------------------------------------ memory of a process


def rss_bytes(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
