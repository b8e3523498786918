"""Quantization methods, one module each, registered here by name (the `runs.<name>.method` values)."""
from vlmquant.errors import VlmquantError
from vlmquant.methods import awq, gptq, mbq, rtn, smoothquant
from vlmquant.methods.base import COMMON, Method

METHODS = {m.name: m for m in (mbq.METHOD, awq.METHOD, smoothquant.METHOD, rtn.METHOD, gptq.METHOD)}


def get_method(name) -> Method:
    if name not in METHODS:
        raise VlmquantError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["COMMON", "METHODS", "Method", "get_method"]
