"""Host-agnostic core of ComfyUI-DomainStudio.

    run.py        the one run entry point: host + method + settings + images -> result and files
    loop.py       the one training loop (optimizer, clipping, NaN/divergence stop, progress, resume)
    methods/      the registered methods (DomainStudio, fine-tuning, rare-token, TI, DreamBooth)
    host.py       the contract a model host implements (hosts/comfy.py, hosts/diffusers.py)
    files.py      what a run writes: formats, names, metadata, snapshots, resume
    settings.py   every setting declared once (nodes and dstrain are generated from it)
    memory.py     measured step memory, the memory choice and the memory guard
    losses.py     the paper's equations, one per function
    deltas.py, embeddings.py, imageset.py, layers.py, plot.py, grids.py, errors.py

Pure torch outside hosts/: only hosts/comfy*.py import ComfyUI, only hosts/diffusers.py imports
diffusers, and nothing imports a host but the frontends (nodes/, dstrain/)."""
