"""ComfyUI node classes (V3 API, pinned as comfy_api.v0_0_2). Thin: parse inputs, call trainer/,
wrap outputs."""

import logging

import folder_paths
from comfy_api.v0_0_2 import ComfyExtension

from ..trainer import deltas
from .domainstudio import DomainStudioTrainer
from .image_set import FewShotImageSet
from .personalize import PersonalizeTrainer
from .weights import DomainStudioLoadWeights

NODES = [FewShotImageSet, DomainStudioTrainer, PersonalizeTrainer, DomainStudioLoadWeights]


def _remove_stale_temp_files() -> None:
    """A crash mid-save leaves a hidden temporary file in a model folder; clear them at load."""
    folders = []
    for kind in ("loras", "embeddings"):
        try:
            folders += folder_paths.get_folder_paths(kind)
        except Exception:  # noqa: BLE001 - a ComfyUI without that folder kind
            pass
    removed = deltas.remove_stale_temp_files(folders)
    if removed:
        logging.getLogger("DomainStudio").info("DomainStudio: removed %d temporary file(s) a crash left behind",
                                               len(removed))


class DomainStudioExtension(ComfyExtension):
    async def get_node_list(self):
        _remove_stale_temp_files()  # ComfyUI calls this once, when it loads the pack
        return list(NODES)


__all__ = ["DomainStudioExtension", "NODES"]
