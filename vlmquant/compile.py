"""torch.compile for the element-wise hot spots, on CUDA only (eager elsewhere).

Set VLMQUANT_COMPILE=0 to run eagerly everywhere.
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
        if args[0].is_cuda and os.environ.get("VLMQUANT_COMPILE", "1") != "0":
            if compiled is None:
                compiled = torch.compile(fn, dynamic=False)
            return compiled(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper
