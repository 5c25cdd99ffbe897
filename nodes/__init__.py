"""ComfyUI node classes (V3 API, pinned as comfy_api.v0_0_2). Thin: parse inputs, call trainer/,
wrap outputs."""

from comfy_api.v0_0_2 import ComfyExtension

from .domainstudio import DomainStudioTrainer
from .image_set import FewShotImageSet
from .weights import DomainStudioLoadWeights
from .personalize import PersonalizeTrainer

NODES = [FewShotImageSet, DomainStudioTrainer, PersonalizeTrainer, DomainStudioLoadWeights]


class DomainStudioExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)


__all__ = ["DomainStudioExtension", "NODES"]
