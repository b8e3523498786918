"""Model-family adapters, one file per family, registered by family name."""
from vlmquant.errors import VlmquantError
from vlmquant.models.base import Adapter, ScaleGroup
from vlmquant.models.internvl import InternVL
from vlmquant.models.llava import Llava
from vlmquant.models.llava_onevision import LlavaOnevision
from vlmquant.models.qwen2vl import Qwen2VL, Qwen25VL

ADAPTERS = {a.family: a for a in (Qwen2VL(), Qwen25VL(), Llava(), LlavaOnevision(), InternVL())}


def get_adapter(family) -> Adapter:
    if family not in ADAPTERS:
        raise VlmquantError(f"unknown model family {family!r}; known: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[family]


__all__ = ["ADAPTERS", "Adapter", "ScaleGroup", "get_adapter"]
