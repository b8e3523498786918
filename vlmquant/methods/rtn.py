"""Round to nearest: the fp weights quantized as they are, no scales."""
from vlmquant.methods.base import Method

METHOD = Method(name="rtn", summary="round to nearest, no scales")
