"""Export settings without a workflow run: metadata written into a safetensors header, export.ignore patterns."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlmquant.errors import VlmquantError
from vlmquant.export.checkpoint import set_safetensors_metadata
from vlmquant.quant.model import resolve_ignore


def test_header_rewrite_keeps_tensors(tmp_path):
    path = tmp_path / "x.safetensors"
    data = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.ones(1, dtype=torch.bfloat16)}
    save_file(data, path, metadata={"format": "pt"})
    set_safetensors_metadata(path, {"vlmquant": '{"x": 1}'})
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "vlmquant": '{"x": 1}'}
    again = load_file(path)
    assert all(torch.equal(again[k], data[k]) for k in data)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0


def test_ignore_patterns_resolve():
    names = [f"layers.{i}.{m}" for i in range(12) for m in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert resolve_ignore(names, ["mlp.down_proj"]) == {f"layers.{i}.mlp.down_proj" for i in range(12)}
    assert resolve_ignore(names, ["layers.0.self_attn.q_proj"]) == {"layers.0.self_attn.q_proj"}
    assert len(resolve_ignore(names, ["layers.1"])) == 7  # whole segments: not layers.10, layers.11
    assert len(resolve_ignore(names, ["self_attn"])) == 48
    assert resolve_ignore(names, ["layers.1*.mlp.*_proj"]) == {f"layers.{i}.mlp.{p}_proj" for i in (1, 10, 11)
                                                              for p in ("gate", "up", "down")}
    for bad in ("down", "mlp.down", "vision.blocks.0", "lm_head"):
        with pytest.raises(VlmquantError, match="export.ignore"):
            resolve_ignore(names, [bad])
