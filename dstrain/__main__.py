"""`python -m dstrain` (from the repository) or `python path/to/repo/dstrain` (from anywhere).

Registers the pack under its one package name (see the repository's __init__.py) and runs the
command-line frontend, comfyui_domainstudio.dstrain.cli."""

import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
runpy.run_path(os.path.join(REPO, "__init__.py"))

from comfyui_domainstudio.dstrain.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
