"""Load a packed (compressed-tensors) checkpoint folder in transformers with the one call that works for its scheme.

Measured with compressed-tensors 0.20 on the demo Qwen2-VL (tests/test_loading.py): transformers 5.23, 5.24
and 5.25 load symmetric schemes (W4A16/W8A16 sym, W8A8 int8, W4A8, FP8) with a plain `from_pretrained(folder)`,
which keeps activation quantization at run time. Asymmetric pack-quantized folders (W4/W8/W3 with a zero point)
fail there: transformers creates the zero-point parameter unpacked ([out, groups]) while the folder stores it
packed along the output dim ([out·bits/32, groups]), so the load stops with "size mismatch". Asked to dequantize
on load (`CompressedTensorsConfig(dequantize=True)`), every scheme loads; the model then runs dense.
"""
import json
from pathlib import Path

from vlmquant.errors import VlmquantError
from vlmquant.io.model_folder import load_whole


def needs_dequantize(folder):
    """True when `folder`'s config.json quantization_config has a config group with asymmetric weights (a zero
    point), which transformers' plain load refuses (module docstring). Raises VlmquantError when config.json is
    missing or has no compressed-tensors quantization_config."""
    config = Path(folder) / "config.json"
    try:
        quant = json.loads(config.read_text())["quantization_config"]
    except (OSError, KeyError, json.JSONDecodeError):
        raise VlmquantError(f"{config}: no compressed-tensors quantization_config; is {folder} a packed/ folder?") \
            from None
    if quant.get("quant_method") != "compressed-tensors":
        raise VlmquantError(f"{config}: quantization_config.quant_method is {quant.get('quant_method')!r}, "
                            "expected 'compressed-tensors'")
    return any(not (group.get("weights") or {}).get("symmetric", True) for group in quant["config_groups"].values())


def load_packed(folder, model_class=None, dtype=None, **kwargs):
    """A packed checkpoint folder as a transformers model (eval mode is the caller's).

    model_class: a transformers class (default: the one config.json's `architectures` names, e.g.
    Qwen2VLForConditionalGeneration). Asymmetric schemes load dequantized (dense weights, equal to the pseudo
    checkpoint's); symmetric ones with the plain call (weights decompressed on the first forward; W8A8/W4A8/FP8
    quantize activations per token at run time). kwargs go to from_pretrained. Raises VlmquantError when the
    folder is not a compressed-tensors checkpoint or names an architecture transformers does not have, and when
    transformers leaves a weight unset (io.model_folder.load_whole: per-expert experts it cannot read).
    """
    import transformers

    dequantize = needs_dequantize(folder)
    if model_class is None:
        arch = (json.loads((Path(folder) / "config.json").read_text()).get("architectures") or [None])[0]
        model_class = getattr(transformers, str(arch), None)
        if model_class is None:
            raise VlmquantError(f"{folder}/config.json: architecture {arch!r} is not in transformers "
                                f"{transformers.__version__}; pass model_class")
    if dequantize:
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    return load_whole(model_class, folder, dtype=dtype, **kwargs)
