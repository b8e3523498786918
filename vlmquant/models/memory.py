"""Memory budgets of every stage: free memory, bytes per token, micro-batch sizes, where records are kept.

Each stage that holds activations asks this module how much it may hold (DESIGN.md: memory grows with the
chunk, not the model): `use_streaming` (whole model resident or decoder layers one at a time),
`acts_micro_batch` (boundary activations), `search_micro_batch` (the search's micro-batches and whether
its scale-group records go to host memory), `grads_store` (where the streamed gradient pass stores layer
inputs, in how many rounds). The estimates read the model config and the free memory of the device
(`device_free_bytes`); `memory.max_batch_mb` and `memory.grads_store_mb` override them. Results never
depend on these choices, only speed and peak memory.

Functions that take `sm` read a models.stream.StreamedModel's skeleton config, dtype, device and
layer_bytes().
"""
import logging
from pathlib import Path

import torch

from vlmquant.errors import VlmquantError
from vlmquant.models.loading import meta_model

log = logging.getLogger(__name__)

STREAM_MODES = ("auto", "always", "never")
RESIDENT_SHARE = 0.6  # auto: keep the model resident when its weights take at most this share of the free memory
MB = 2**20


# --- what there is --------------------------------------------------------------------------------
def device_free_bytes(device):
    """Bytes this process may still allocate on `device`: for CUDA the free device memory plus what torch holds
    unused, within torch.cuda.set_per_process_memory_fraction's cap; for the CPU the host's available memory."""
    device = torch.device(device)
    if device.type != "cuda":
        return host_free_bytes()
    free, total = torch.cuda.mem_get_info(device)
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
    return max(0, min(free + reserved - allocated, int(total * fraction) - allocated))


def host_free_bytes():
    """MemAvailable of /proc/meminfo (Linux), else a large number."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def model_bytes(skeleton, dtype):
    """Bytes of the model's parameters in `dtype` (floating ones; others as they are)."""
    size = dtype_bytes(dtype)
    return sum(p.numel() * (size if p.is_floating_point() else p.element_size()) for p in skeleton.parameters())


def use_streaming(mode, ref, every_layer=True):
    """Whether a stage streams decoder layers: mode always / never, or auto: stream unless the model's weights
    take at most RESIDENT_SHARE of the device's free memory, and always for a stage that does not run every layer
    (`every_layer` False: reading only what it runs is never slower). Raises VlmquantError for another mode."""
    if mode not in STREAM_MODES:
        raise VlmquantError(f"config: memory.stream: {mode!r} is not one of {', '.join(STREAM_MODES)}")
    if mode != "auto" or not every_layer:
        return mode != "never"
    need = model_bytes(meta_model(ref.adapter, ref.path, ref.trust_remote_code), ref.dtype)
    free = device_free_bytes(ref.device)
    stream = need > RESIDENT_SHARE * free
    log.info("model weights %.1f GiB, free %s memory %.1f GiB: %s", need / 2**30, torch.device(ref.device).type,
             free / 2**30, "streaming decoder layers" if stream else "whole model resident")
    return stream


def text_widths(config):
    """(hidden size, MLP intermediate size) of a model config's text model; 4 x hidden where it names none."""
    text = config.get_text_config()
    return text.hidden_size, getattr(text, "intermediate_size", None) or 4 * text.hidden_size


def layer_token_bytes(config, dtype, backward=False):
    """Estimated peak activation bytes per token of one decoder-layer forward (its hidden input and output, the
    attention projections, the MLP's gate, up and product), twice that with autograd's saved tensors."""
    hidden, inter = text_widths(config)
    per = (8 * hidden + 4 * inter) * dtype_bytes(dtype)
    return 2 * per if backward else per


def micro_batch(n_samples, tokens, token_bytes, budget):
    """Samples per micro-batch so that one batch's activations (tokens per sample x token_bytes) fit `budget`
    bytes; every sample at once when budget is None. At least 1."""
    if budget is None:
        return n_samples
    return max(1, min(n_samples, int(budget // max(1, tokens * token_bytes))))


def activation_budget(device, max_batch_mb, reserve=0):
    """Bytes of activations a micro-batch may take: memory.max_batch_mb, else (CUDA) the free device memory
    less `reserve`, else (CPU) no limit (None)."""
    if max_batch_mb is not None:
        return int(max_batch_mb) * MB
    if torch.device(device).type != "cuda":
        return None
    return max(0, device_free_bytes(device) - reserve)


def dtype_bytes(dtype):
    """Bytes of one element of `dtype`."""
    return torch.tensor([], dtype=dtype).element_size()


def tensor_bytes(t):
    return t.numel() * t.element_size()


def pinned(shape, dtype):
    """An empty host tensor, page-locked when a GPU is present (fast, asynchronous copies)."""
    return torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())


# --- what each stage may hold ---------------------------------------------------------------------
def acts_micro_batch(sm, n, tokens, max_batch_mb=None):
    """Samples per forward of the boundary-activations job (n samples of `tokens` positions): what fits next to
    a decoder layer's weights and the hidden states of every sample in and out."""
    width = text_widths(sm.skeleton.config)[0] * dtype_bytes(sm.dtype)
    budget = activation_budget(sm.device, max_batch_mb, reserve=sm.layer_bytes() + 2 * n * tokens * width)
    return micro_batch(n, tokens, layer_token_bytes(sm.skeleton.config, sm.dtype), budget)


def search_micro_batch(sm, hidden, max_batch_mb=None):
    """(samples per micro-batch of a search job's layer forwards, whether search_layer keeps its records in host
    memory). The records (the inputs and fp outputs of every scale group, five hidden-size and one MLP-size
    tensor over all tokens, and the loss-token copy of the largest group's: one more of each) stay on the device
    when they fit its free memory next to a layer's weights and its input and output; on a GPU where they do not,
    they go to host memory, and a micro-batch then also holds one group's records of its samples. Micro-batches:
    what memory.max_batch_mb allows, else what is left."""
    n, tokens = hidden.shape[:2]
    width, inter = text_widths(sm.skeleton.config)
    element = hidden.element_size()
    records = n * tokens * (6 * width + 2 * inter) * element
    reserve = sm.layer_bytes() + 2 * tensor_bytes(hidden)
    token_bytes = layer_token_bytes(sm.skeleton.config, sm.dtype)
    host = torch.device(sm.device).type == "cuda" and reserve + records + tokens * token_bytes > \
        device_free_bytes(sm.device)
    if host:
        token_bytes += (width + inter) * element
        log.info("search: the scale groups' records (%.1f GiB) do not fit the device: kept in host memory",
                 records / 2**30)
    per_batch = micro_batch(n, tokens, token_bytes,
                            activation_budget(sm.device, max_batch_mb, reserve=reserve + (0 if host else records)))
    if per_batch < n:
        log.info("search: layer forwards in micro-batches of %d of %d samples", per_batch, n)
    return per_batch, host


def grads_store(sm, tokens, max_store_bytes=None):
    """(place, rounds) of the streamed gradient pass (plan_store) for batches of `tokens` padded positions each:
    every batch stores one hidden state per decoder layer; a layer's weights twice and a backward pass's
    activations are reserved."""
    width = text_widths(sm.skeleton.config)[0] * dtype_bytes(sm.dtype)
    sizes = [sm.n_layers * t * width for t in tokens]
    reserve = 2 * sm.layer_bytes() + max(tokens) * layer_token_bytes(sm.skeleton.config, sm.dtype, backward=True)
    place, rounds = plan_store(sizes, sm.device, reserve, max_store_bytes)
    log.info("grads: stored layer inputs %.2f GiB on %s, %d round(s)", sum(sizes) / 2**30, place, len(rounds))
    return place, rounds


def plan_store(sizes, device, reserve=0, max_store_bytes=None):
    """(where the stored layer inputs live: "device" or "host", rounds: lists of batch indices) for batches whose
    stored inputs take `sizes` bytes. Capped by max_store_bytes, else by the device's free memory less `reserve`
    (a layer's weights and a backward pass's activations) or, on a GPU, half the available host memory, whichever
    holds more. A round holds at least one batch."""
    on_gpu = torch.device(device).type == "cuda"
    device_room = max(0, device_free_bytes(device) - reserve)
    host_room = host_free_bytes() // 2 if on_gpu else 0
    total = sum(sizes)
    if max_store_bytes is not None:
        budget = max_store_bytes
    elif total <= max(device_room, host_room):
        budget = total
    else:
        budget = max(device_room, host_room)
    place = "device" if not on_gpu or budget <= device_room else "host"
    rounds, current, used = [], [], 0
    for b, size in enumerate(sizes):
        if current and used + size > budget:
            rounds.append(current)
            current, used = [], 0
        current.append(b)
        used += size
    rounds.append(current)
    return place, rounds
