"""vlmquant.load_packed: a packed folder loads on the installed transformers for every scheme, asymmetric (W4, W3:
dequantized on load) and symmetric (plain load), with the pseudo checkpoint's weights."""
import copy
import json

import pytest
import torch
import transformers

import vlmquant
from vlmquant.errors import VlmquantError
from vlmquant.models import get_adapter
from vlmquant.models.tiny import make_demo_model
from vlmquant.quant.quantizer import quantizer
from vlmquant.quant.model import decoder_linears, layer_root
from vlmquant.quant.scheme import Scheme

pytest.importorskip("compressed_tensors", reason="the packed export needs compressed-tensors")
from vlmquant.export.packed import write_packed  # noqa: E402

ADAPTER = get_adapter("qwen2_vl")
SCHEMES = {s.name: s for s in (Scheme(4, 128), Scheme(3, 128), Scheme(4, -1, True), Scheme(8, -1, True, a_bit=8))}


@pytest.fixture(scope="module")
def demo():
    model, _ = make_demo_model("qwen2_vl")
    return model.to(torch.bfloat16), [n for n, _ in decoder_linears(model, ADAPTER)]


@pytest.mark.parametrize("name", SCHEMES)
def test_load_packed_gives_the_pseudo_weights(demo, tmp_path, name):
    model, names = demo
    scheme = SCHEMES[name]
    write_packed(copy.deepcopy(model), ADAPTER, names, scheme, tmp_path / "packed",
                 info={"run": "test-run", "scale_cache_sha256": "0" * 64}, source=None)
    if not scheme.symmetric:  # the reason for the helper: the plain call fails on these
        with pytest.raises(RuntimeError, match="mismatch"):
            transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "packed", dtype=torch.bfloat16)
    loaded = vlmquant.load_packed(tmp_path / "packed", dtype=torch.bfloat16)
    assert type(loaded) is transformers.Qwen2VLForConditionalGeneration
    assert hasattr(layer_root(loaded, ADAPTER).get_submodule(names[0]), "quantization_scheme") == scheme.symmetric
    with torch.no_grad():
        loaded(input_ids=torch.tensor([[1, 2, 3]]))  # a compressed (symmetric) model decompresses on its first forward
    got, root = layer_root(loaded, ADAPTER), layer_root(model, ADAPTER)
    for n in names:
        assert torch.equal(got.get_submodule(n).weight, quantizer(scheme).weight(root.get_submodule(n).weight)), n


def test_not_a_packed_folder(demo, tmp_path):
    model, _ = demo
    model.save_pretrained(tmp_path)
    with pytest.raises(VlmquantError, match=r"config.json: no compressed-tensors quantization_config"):
        vlmquant.load_packed(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(VlmquantError, match="quant_method is 'gptq'"):
        vlmquant.load_packed(tmp_path)
