"""Lets PyPI's torchvision import beside CPU torch. tests/vllm_venv.sh installs it into the vLLM venv as
_torchvision_cpu_shim.py, imported at start-up by a .pth line.

PyPI's torchvision wheel is linked against CUDA torch: beside torch+cpu its ops library (_C.so) does not load,
and `import torchvision` then fails at its two unguarded fake registrations ("operator torchvision::nms does not
exist", then qnms). On the first import of torchvision this finder tries that library and, when it does not
load, declares those two schemas, so the pure-Python parts import (transforms.v2, used by transformers' Qwen2-VL
image and video processors); torchvision.ops stay unusable.
"""
import importlib.abc
import importlib.util
import sys
from pathlib import Path


class _TorchvisionShim(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        spec = importlib.util.find_spec("torchvision")
        libs = sorted(Path(spec.submodule_search_locations[0]).glob("_C*.so")) if spec else []
        try:
            torch.ops.load_library(str(libs[0]))
        except (IndexError, OSError):
            for op in ("nms", "qnms"):
                torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return None


sys.meta_path.insert(0, _TorchvisionShim())
