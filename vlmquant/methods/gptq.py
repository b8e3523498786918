"""GPTQ alone (arXiv 2210.17323): no scales, every quantized decoder weight rounded column by column with the
error compensated through the inverse Hessian of its calibration inputs (vlmquant.search.gptq). awq and mbq
runs take `gptq: true` for the same rounding after their scales are folded.

Its rounding: vlmquant.search.gptq_layer.gptq_layer, run by the search job of every run with `spec.gptq`."""
from vlmquant.methods.base import GPTQ_SETTINGS, Method

METHOD = Method(
    name="gptq",
    summary="GPTQ rounding of the fp weights (Hessian uniform or modality-weighted), no scales",
    settings=GPTQ_SETTINGS,
    defaults=(("gptq", True),),
)
