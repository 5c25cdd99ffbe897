"""Model hosts (trainer/host.py's contract): comfy.py (+ comfy_compat.py, the one place for
ComfyUI internals, and comfy_files.py for applying saved files) and diffusers.py."""
