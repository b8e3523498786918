"""A search job whose scale-group records do not fit the device keeps them in host memory (that they pick the same
alpha there: test_stream.test_host_records_pick_the_same_alpha_on_the_gpu); channel statistics are read in chunks
without a full copy of the group input."""
from types import SimpleNamespace

import pytest
import torch

from vlmquant.errors import VlmquantError
from vlmquant.models import memory
from vlmquant.search.grid import channel_stat

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
    monkeypatch.setattr(memory, "device_free_bytes", lambda device: free_bytes)
    return sm, torch.empty(128, 640, 3584, dtype=torch.bfloat16, device="meta")


def test_records_go_to_host_memory_only_when_they_do_not_fit(monkeypatch):
    sm, hidden = shape_7b("cuda", 80 * GiB, monkeypatch)
    assert memory.search_micro_batch(sm, hidden) == (128, False)  # an H100: all on the device, one forward
    sm, hidden = shape_7b("cuda", 8 * GiB, monkeypatch)  # an 8 GiB cap: about 9 GiB of records do not fit
    per_batch, host = memory.search_micro_batch(sm, hidden)
    assert host and 1 < per_batch < 128
    token = memory.layer_token_bytes(sm.skeleton.config, torch.bfloat16)
    # the layer, its input and output, and one micro-batch's activations and records fit the 8 GiB
    held = sm.layer_bytes() + 2 * hidden.numel() * 2 + per_batch * 640 * (token + (3584 + 18944) * 2)
    assert held <= 8 * GiB < held + 640 * (token + (3584 + 18944) * 2)
    assert memory.search_micro_batch(sm, hidden, max_batch_mb=1024) == (1024 * 2**20 // (640 * (token + 45056)), True)
    sm, hidden = shape_7b("cpu", 8 * GiB, monkeypatch)  # on the CPU the host is the device
    assert not memory.search_micro_batch(sm, hidden)[1]
