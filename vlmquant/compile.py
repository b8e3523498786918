"""Opt-in torch.compile for the element-wise hot spots of the search, on CUDA only.

VLMQUANT_COMPILE=1 fuses the weight and activation quantizers and the loss (7B layer on an H200 at the
90 % loss-token share: 1.65 s instead of 1.76 s weight-only), but every job then pays the compile time
(about 20 s cold): worth it for long layer chunks or a warm compile cache, not by default.
"""
import functools
import os

import torch


def cuda_compiled(fn):
    """`fn` compiled (static shapes) when its first tensor argument is on a CUDA device."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal compiled
        if args[0].is_cuda and os.environ.get("VLMQUANT_COMPILE") == "1":
            if compiled is None:
                compiled = torch.compile(fn, dynamic=False)
            return compiled(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper
