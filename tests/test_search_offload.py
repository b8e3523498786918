"""A search job whose scale-group records do not fit the device keeps them in host memory and picks the same
alpha; channel statistics are read in chunks without a full copy of the group input."""
from types import SimpleNamespace

import pytest
import torch

from conftest import open_demo, run_spec
from test_calib import coco_cfg
from vlmquant.data.calib import build_calib
from vlmquant.data.inputs import build_inputs
from vlmquant.errors import VlmquantError
from vlmquant.io import ragged
from vlmquant.models import stream
from vlmquant.search import pipeline as P
from vlmquant.search.capture import capture_layer_inputs, load_samples, token_masks
from vlmquant.search.grid import channel_stat
from vlmquant.search.layer import record_layer, search_layer

GiB = 2**30


def test_channel_stat_in_chunks_equals_the_whole():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 16, generator=g) * torch.linspace(0.1, 4, 16)
    valid = torch.ones(3, 50, dtype=torch.bool)
    valid[1, 20:] = False  # padding, one chunk of 8 rows entirely so
    x[1, 20:] = 1e6  # padding holds garbage that must not count
    masks = {"valid": valid}
    rows = x[valid]
    for chunk_rows in (1, 8, 1000):
        mean = channel_stat(x, masks, "cpu", "mean", chunk_bytes=chunk_rows * 16 * 4)
        assert mean.dtype == torch.float32 and mean.shape == (16,)
        torch.testing.assert_close(mean, rows.abs().mean(0), rtol=1e-6, atol=0)
        assert torch.equal(channel_stat(x, masks, "cpu", "max", chunk_bytes=chunk_rows * 16 * 4), rows.abs().amax(0))
    assert torch.equal(x[1, 20:], torch.full((30, 16), 1e6))  # x itself is not changed
    with pytest.raises(VlmquantError, match="no valid"):
        channel_stat(x, {"valid": torch.zeros_like(valid)}, "cpu")


def shape_7b(device, free_bytes, monkeypatch):
    """A search job of a Qwen2-VL-7B-shaped layer (0.47 GiB of bf16 weights, 128 x 640 tokens) on `device` with
    `free_bytes` free."""
    text = SimpleNamespace(hidden_size=3584, intermediate_size=18944)
    config = SimpleNamespace(get_text_config=lambda: text)
    sm = SimpleNamespace(device=device, dtype=torch.bfloat16, skeleton=SimpleNamespace(config=config),
                         layer_bytes=lambda: 233_000_000 * 2)
    monkeypatch.setattr(P, "device_free_bytes", lambda device: free_bytes)
    monkeypatch.setattr(stream, "device_free_bytes", lambda device: free_bytes)
    return sm, torch.empty(128, 640, 3584, dtype=torch.bfloat16, device="meta")


def test_records_go_to_host_memory_only_when_they_do_not_fit(monkeypatch):
    sm, hidden = shape_7b("cuda", 80 * GiB, monkeypatch)
    assert P.search_micro_batch(sm, hidden) == (128, False)  # an H100: all on the device, one forward
    sm, hidden = shape_7b("cuda", 8 * GiB, monkeypatch)  # an 8 GiB cap: about 9 GiB of records do not fit
    per_batch, host = P.search_micro_batch(sm, hidden)
    assert host and 1 < per_batch < 128
    token = stream.layer_token_bytes(SimpleNamespace(get_text_config=sm.skeleton.config.get_text_config),
                                     torch.bfloat16)
    # the layer, its input and output, and one micro-batch's activations and records fit the 8 GiB
    held = sm.layer_bytes() + 2 * hidden.numel() * 2 + per_batch * 640 * (token + (3584 + 18944) * 2)
    assert held <= 8 * GiB < held + 640 * (token + (3584 + 18944) * 2)
    assert P.search_micro_batch(sm, hidden, max_batch_mb=1024) == (1024 * 2**20 // (640 * (token + 45056)), True)
    sm, hidden = shape_7b("cpu", 8 * GiB, monkeypatch)  # on the CPU the host is the device
    assert not P.search_micro_batch(sm, hidden)[1]


@pytest.fixture(scope="module")
def layer0(demo_data, demo_model_path, tmp_path_factory):
    """Decoder layer 0 of the demo model and its inputs on 5 calibration samples."""
    d = tmp_path_factory.mktemp("offload")
    model = open_demo(demo_model_path)
    build_calib(coco_cfg(demo_data, n_samples=5), d / "calib.parquet")
    build_inputs(d / "calib.parquet", model, d / "inputs.safetensors")
    full = model.load()
    batch = ragged.collate(load_samples(d / "inputs.safetensors")[0])
    hidden, args = capture_layer_inputs(full, model.adapter.layers(full), batch, "cpu", torch.float32)
    return model, hidden, args.kwargs(0), token_masks(batch)


@pytest.mark.gpu
@pytest.mark.parametrize("spec, ratios", [(run_spec("w4a8", method="mbq", w_bit=4, a_bit=8, n_grid=4),
                                           {"attn": 2.0, "mlp": 1.5}),
                                          (run_spec("awq", method="awq", w_bit=3, n_grid=6), None)], ids=["w4a8", "awq"])
def test_host_records_pick_the_same_alpha_on_the_gpu(layer0, spec, ratios):
    torch.backends.cuda.matmul.allow_tf32 = False
    model, hidden, kwargs, masks = layer0
    to = lambda v: v.cuda() if isinstance(v, torch.Tensor) else tuple(map(to, v)) if isinstance(v, tuple) else v  # noqa: E731
    hidden, kwargs, masks = hidden.cuda(), {k: to(v) for k, v in kwargs.items()}, {k: v.cuda() for k, v in masks.items()}
    out = {}
    for host in (False, True):
        layer = model.load_layers([0])[0].cuda()
        groups = model.adapter.resolve_groups(layer, 0)
        if host:
            _, records = record_layer(layer, groups, hidden, kwargs, 2, host=True)
            kept = [t for r in records.values() for t in (r["x"], *(p["out"] for p in r["parts"]))]
            assert all(t.device.type == "cpu" and t.is_pinned() for t in kept)
        out[host] = search_layer(layer, groups, hidden, kwargs, masks, spec, ratios, 2, host)
    (device, fp_a), (hosted, fp_b) = out[False], out[True]
    for a, b in zip(device, hosted):
        assert a.alpha == b.alpha
        torch.testing.assert_close(torch.as_tensor(a.losses), torch.as_tensor(b.losses), rtol=1e-5, atol=0)
    assert torch.equal(fp_a, fp_b)
