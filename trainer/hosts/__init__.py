"""Host adapters: the only place trainer/ may import a host (ComfyUI, diffusers)."""
