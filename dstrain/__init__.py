"""Headless trainer: `python -m dstrain` / `python path/to/repo/dstrain` (cli.py)."""
