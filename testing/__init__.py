"""Shared test scaffolding, importable as ``comfyui_domainstudio.testing`` (tests, benchmarks).

``testing.toy`` holds ToyHost, a tiny pure-torch model implementing the host contract
(trainer/host.py), so the core (loop, methods, run, files) is tested without ComfyUI, diffusers or
real weights. Importing this package imports nothing; each module says what it needs."""
