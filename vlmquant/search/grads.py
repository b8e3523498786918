"""Modality gradient statistics → reweight ratios (DESIGN.md, algorithm step 1).

For each decoder layer's attention output projection and MLP output projection, the mean
|∂loss/∂output| over vision positions and over caption positions of each sample, averaged
over samples. The sites are the first of Adapter.attn_out / mlp_out a layer has: a
linear-attention layer's out_proj, a MoE block's output (no single down_proj). loss = mean
caption-token NLL of that sample. Only activation gradients are computed: every parameter is
frozen and the gradient enters at the token embeddings.
"""
import logging

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlmquant.errors import VlmquantError
from vlmquant.io import ragged
from vlmquant.models.memory import grads_store, pinned
from vlmquant.models.capture import model_inputs, token_masks
from vlmquant.search.lean import lean_forwards

log = logging.getLogger(__name__)

SITES = ("attn", "mlp")


def caption_losses(hidden, labels, head):
    """Per-sample mean caption NLL, (B,), from the final (normed) hidden states (B, T, C), computing logits
    only at caption positions."""
    target = labels[:, 1:]  # token t+1 is predicted at position t
    pos = target != -100
    logits = head(hidden[:, :-1][pos]).float()  # (N_cap, V)
    nll = F.cross_entropy(logits, target[pos], reduction="none")
    row = pos.nonzero()[:, 0]
    counts = pos.sum(1)
    if (counts == 0).any():
        raise VlmquantError("a calibration sample has no caption tokens; cannot compute caption-loss gradients")
    return torch.zeros(labels.shape[0], device=hidden.device).index_add_(0, row, nll) / counts


def sample_losses(model, batch, device, dtype):
    """Per-sample mean caption NLL of a whole model, (B,)."""
    trunk = getattr(model, model.base_model_prefix)  # the model without its LM head
    hidden = trunk(**model_inputs(batch, device, dtype), use_cache=False).last_hidden_state  # (B, T, C)
    return caption_losses(hidden, batch["labels"].to(device), model.get_output_embeddings())


class GradStats:
    """Sums of per-sample mean |grad| at each decoder layer's attention and MLP outputs, over vision and caption
    tokens; hooks feed it during backward passes, batch by batch (`use(batch)` first)."""

    def __init__(self, n_layers, device):
        self.device = device
        self.sums = {s: {k: torch.zeros(n_layers, dtype=torch.float64, device=device) for k in ("vis", "cap")}
                     for s in SITES}
        self.counts = {"vis": 0, "cap": 0}
        self.current = {}

    def masks(self, batch):
        """{"vis", "cap"} float token masks (B, T) of a collated batch on the device; counted once per batch."""
        masks = token_masks(batch, self.device)
        out = {k: masks[k].float() for k in ("vis", "cap")}
        for k in out:
            self.counts[k] += int(out[k].sum())
        return out

    def hook(self, site, i):
        """Forward hook of layer i's `site` output module: accumulates its output gradient under the current masks."""
        def accumulate(g):
            a = torch.linalg.vector_norm(g.detach(), 1, dim=-1, dtype=torch.float32)  # (b, T): sum |g| over channels
            for key in ("vis", "cap"):
                m = self.current[key]
                per_sample = (a * m).sum(1) / (m.sum(1) * g.shape[-1]).clamp(min=1)  # mean |g| per sample
                self.sums[site][key][i] += per_sample.double().sum()

        def hook(module, args, output):
            output.register_hook(accumulate)
        return hook

    def result(self, n_samples):
        """({site: {"vis": (L,), "cap": (L,)}} averaged over samples, on the CPU; token counts)."""
        for site in SITES:
            for key in ("vis", "cap"):
                bad = (~torch.isfinite(self.sums[site][key])).nonzero()
                if len(bad):
                    raise VlmquantError(f"non-finite gradient at decoder layer {int(bad[0])} ({site} output, {key} tokens)")
        return {s: {k: (v / n_samples).float().cpu() for k, v in d.items()} for s, d in self.sums.items()}, self.counts


def site_hooks(adapter, layer, i, stats):
    return [adapter.site(layer, names).register_forward_hook(stats.hook(site, i))
            for site, names in (("attn", adapter.attn_out), ("mlp", adapter.mlp_out))]


def gradient_stats(model, adapter, samples, device, dtype, batch_size=4):
    """{site: {"vis": (L,), "cap": (L,)}} mean |grad| per layer, averaged over samples; plus token counts.

    samples: per-sample tensor dicts (io.ragged.sample); run `batch_size` at a time through the whole model.
    """
    layers = adapter.layers(model)
    stats = GradStats(len(layers), device)
    for p in model.parameters():
        p.requires_grad_(False)
    handles = [h for i, layer in enumerate(layers) for h in site_hooks(adapter, layer, i, stats)]
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    try:
        with lean_forwards(layers, "mlp"):
            for start in tqdm(range(0, len(samples), batch_size), desc="grads", unit="batch"):
                part = ragged.collate(samples[start:start + batch_size])
                stats.current = stats.masks(part)
                losses = sample_losses(model, part, device, dtype)
                if not torch.isfinite(losses).all():
                    raise VlmquantError("non-finite caption loss in the gradient pass")
                losses.sum().backward()  # samples are independent: each gets its own loss's gradient
    finally:
        for h in handles:
            h.remove()
    return stats.result(len(samples))


def streamed_gradient_stats(sm, samples, batch_size=4, max_store_bytes=None):
    """gradient_stats over a models.stream.StreamedModel, decoder layers loaded one at a time: a forward layer by
    layer keeps each layer's input hidden states, the caption loss at the head gives the gradient at the last
    layer's output, then a backward layer by layer in reverse recomputes each layer from its stored input and
    propagates the gradient to its input. Same batches, same statistics.

    The stored inputs (layers x samples x tokens x channels) stay on the device when they fit, else in pinned
    host memory; `max_store_bytes` (or, None, what the free memory allows) caps them, and the batches are then
    taken in rounds, each round running all layers forward and back.
    """
    parts = [samples[s:s + batch_size] for s in range(0, len(samples), batch_size)]
    tokens = [len(p) * max(x["input_ids"].shape[1] for x in p) for p in parts]  # per batch, padded
    place, rounds = grads_store(sm, tokens, max_store_bytes)
    stats = GradStats(sm.n_layers, sm.device)
    for rnd in rounds:
        gradient_round(sm, stats, [ragged.collate(parts[b]) for b in rnd], place)
    return stats.result(len(samples))


def gradient_round(sm, stats, batches, place):
    """One round of streamed_gradient_stats: collated `batches` forward through every layer (each layer's input
    stored on the device or, place "host", in pinned host memory), the caption loss, then back through every layer
    in reverse, adding to `stats`. Everything the round holds is freed when it returns."""
    L, device = sm.n_layers, sm.device
    state = []
    for part in batches:
        hidden, args = sm.capture(part)
        shape = (L, *hidden.shape)
        store = pinned(shape, hidden.dtype) if place == "host" else torch.empty(shape, dtype=hidden.dtype, device=device)
        state.append({"hidden": hidden, "args": args, "store": store, "masks": stats.masks(part),
                      "labels": part["labels"].to(device)})
    sm.phase("host")
    with torch.no_grad():
        for i in tqdm(range(L), desc="grads forward", unit="layer"):
            layer = sm.layer(i)
            for p in state:
                p["store"][i].copy_(p["hidden"], non_blocking=True)
                p["hidden"] = p["args"].forward(layer, i, p["hidden"])
            sm.drop(i)
    sm.phase("head")
    for p in state:
        hidden = p.pop("hidden").requires_grad_(True)
        losses = caption_losses(sm.norm(hidden), p["labels"], sm.head)
        if not torch.isfinite(losses).all():
            raise VlmquantError("non-finite caption loss in the gradient pass")
        losses.sum().backward()
        p["grad"] = hidden.grad
    sm.phase("host")
    for i in tqdm(reversed(range(L)), total=L, desc="grads backward", unit="layer"):
        layer = sm.layer(i)
        handles = site_hooks(sm.adapter, layer, i, stats)
        try:
            with lean_forwards([layer], "mlp"):
                for p in state:
                    stats.current = p["masks"]
                    x = p["store"][i].to(device, non_blocking=True).requires_grad_(True)
                    p["args"].forward(layer, i, x).backward(p["grad"])
                    p["grad"] = x.grad
        finally:
            for h in handles:
                h.remove()
        sm.drop(i)


def reweight_ratios(stats):
    """r = vis / cap per layer; ratio = max(r, median r over layers), per site."""
    out = {}
    for site in SITES:
        r = stats[site]["vis"] / stats[site]["cap"]
        if not torch.isfinite(r).all():
            bad = int((~torch.isfinite(r)).nonzero()[0])
            raise VlmquantError(f"reweight ratio of decoder layer {bad} ({site}) is not finite "
                                f"(vision grad {stats[site]['vis'][bad]:.3g}, caption grad {stats[site]['cap'][bad]:.3g})")
        out[site] = torch.maximum(r, r.quantile(0.5))
    return out
