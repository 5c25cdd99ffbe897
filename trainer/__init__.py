"""Host-agnostic core of ComfyUI-DomainStudio: losses, noise/timestep handling, training loops,
image-set preparation and weight-file IO. Pure torch; no ComfyUI import anywhere in this package
except trainer/hosts/comfy.py, which is imported only by the nodes."""
