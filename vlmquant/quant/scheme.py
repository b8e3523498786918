"""Quantization schemes: how a run's quantized linears are stored and served (no torch: the workflow reads
them when it loads; the codes are in quant/codes.py)."""
from dataclasses import dataclass

from vlmquant.errors import VlmquantError

PACK_QUANTIZED, INT_QUANTIZED, FLOAT_QUANTIZED = "pack-quantized", "int-quantized", "float-quantized"
NVFP4_PACK_QUANTIZED, MXFP4_PACK_QUANTIZED = "nvfp4-pack-quantized", "mxfp4-pack-quantized"
# FP4 (E2M1) weight types and their group sizes along the input dim (quant/fp4.py has the formats)
FP4_GROUP = {"nvfp4": 16, "mxfp4": 32}
# linears that serving engines fuse into one layer (vLLM packed_modules_mapping: qkv_proj, gate_up_proj, and
# Qwen3.5's linear attention in_proj_qkvz): whole or not at all in a packed checkpoint, one NVFP4 global scale
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("in_proj_qkv", "in_proj_z"))


@dataclass(frozen=True)
class Scheme:
    """How a run's quantized linears are stored.

    w_bit: weight bits; w_group: > 0 groups of that many input columns, <= 0 one group per output
    channel; symmetric: no zero point; w_type: "int", "float" (FP8 E4M3, w_bit 8), "nvfp4" or "mxfp4"
    (FP4 E2M1, w_bit 4, symmetric, w_group 16 / 32, quant/fp4.py); a_bit/a_type: dynamic per-token
    activation quantization at serving time (None: weight-only; FP4 W4A4: a_bit 4, a_type "float", per
    token and group of 16 (NVFP4, against a static global input scale) or 32 (MXFP4) channels). Any
    int/FP8 scheme can be fake-quantized (codes.fake_quant; FP4: fp4.fake_quant_fp4); `check_scheme`
    says which have a packed form.
    """
    w_bit: int
    w_group: int = 128
    symmetric: bool = False
    w_type: str = "int"
    a_bit: int | None = None
    a_type: str = "int"

    @property
    def name(self) -> str:
        if self.w_type == "float":
            return "fp8"
        if self.w_type in FP4_GROUP:  # compressed-tensors' preset names: NVFP4 / MXFP4 (W4A4), NVFP4A16, MXFP4A16
            return self.w_type + ("a16" if self.a_bit is None else "")
        weights = f"w{self.w_bit}" + ("a16" if self.a_bit is None else f"a{self.a_bit}")
        group = f"g{self.w_group}" if self.w_group > 0 else "ch"
        return f"{weights}-{'sym' if self.symmetric else 'asym'}-{group}"

    @property
    def format(self) -> str:
        """The compressed-tensors format its quantized linears are written in."""
        if self.w_type == "float":
            return FLOAT_QUANTIZED
        if self.w_type in FP4_GROUP:
            return NVFP4_PACK_QUANTIZED if self.w_type == "nvfp4" else MXFP4_PACK_QUANTIZED
        return INT_QUANTIZED if self.a_bit == 8 and self.w_bit == 8 else PACK_QUANTIZED

    @property
    def experimental(self) -> bool:
        """Packed forms that serving engines do not run everywhere (vLLM: 3-bit only through one CUDA kernel family)."""
        return self.w_type == "int" and self.w_bit == 3


def check_scheme(s: Scheme) -> None:
    """Raise a one-line VlmquantError unless `s` is one of the packed forms above."""
    what = f"scheme w_bit={s.w_bit} w_group={s.w_group} symmetric={s.symmetric} w_type={s.w_type} a_bit={s.a_bit}"
    if s.w_type == "float":
        if not (s.w_bit == 8 and s.a_bit == 8 and s.a_type == "float" and s.symmetric and s.w_group <= 0):
            raise VlmquantError(f"{what}: FP8 is E4M3 weights per channel (w_bit 8, symmetric, w_group -1) with "
                                "FP8 per-token activations (a_bit 8, a_type float)")
        return
    if s.w_type in FP4_GROUP:
        check_fp4(s, what)
        return
    if s.w_type != "int" or s.a_type != "int":
        raise VlmquantError(f"{what}: w_type must be 'int', 'float', 'nvfp4' or 'mxfp4' and a_type 'int' or 'float'")
    if s.a_bit is None:
        if s.w_bit not in (3, 4, 8):
            raise VlmquantError(f"{what}: weight-only packed export supports w_bit 3 (experimental), 4 or 8; "
                                "export other widths as pseudo")
        return
    if s.a_bit != 8 or s.w_bit not in (4, 8) or not s.symmetric or s.w_group > 0:
        raise VlmquantError(f"{what}: weight-activation packed export supports W8A8 and W4A8: symmetric int weights "
                            "per channel (w_group -1) with int8 per-token activations")


def check_fp4(s: Scheme, what: str) -> None:
    """Raise unless `s` is NVFP4 or MXFP4, weight-only or W4A4 (FP4 activations of the same format)."""
    group = FP4_GROUP[s.w_type]
    if s.w_bit != 4 or s.w_group != group or not s.symmetric:
        raise VlmquantError(f"{what}: {s.w_type} is FP4 E2M1 weights in groups of {group}: w_bit 4, w_group {group}, "
                            "symmetric")
    if s.a_bit is None:
        return
    if s.a_bit != 4 or s.a_type != "float":
        raise VlmquantError(f"{what}: {s.w_type} activations are FP4 of the same format (a_bit 4, a_type float), "
                            "or none (a_bit unset)")


def fused_sets(names) -> list[list[int]]:
    """The indices of `names` (module names, any prefix) partitioned into the sets a serving engine fuses into one
    layer (FUSED members under one parent), in order of first appearance; every other name alone."""
    sets, where = [], {}
    for i, name in enumerate(names):
        parent, _, leaf = name.rpartition(".")
        group = next((k for k, members in enumerate(FUSED) if leaf in members), None)
        key = (parent, group) if group is not None else None
        if key in where:
            sets[where[key]].append(i)
            continue
        if key is not None:
            where[key] = len(sets)
        sets.append([i])
    return sets
