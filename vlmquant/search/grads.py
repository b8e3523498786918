"""Modality gradient statistics → reweight ratios (DESIGN.md, algorithm step 1).

For each decoder layer's attention output projection and MLP output projection, the mean
|∂loss/∂output| over vision positions and over caption positions of each sample, averaged
over samples. The sites are the first of Adapter.attn_out / mlp_out a layer has: a
linear-attention layer's out_proj, a MoE block's output (no single down_proj). loss = mean caption-token NLL of that sample. Only activation gradients are
computed: every parameter is frozen and the gradient enters at the token embeddings.
"""
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlmquant.errors import VlmquantError
from vlmquant.io import ragged
from vlmquant.search.capture import model_inputs
from vlmquant.search.lean import lean_forwards

SITES = ("attn", "mlp")


def sample_losses(model, batch, device, dtype):
    """Per-sample mean caption NLL, (B,), computing logits only at caption positions."""
    trunk = getattr(model, model.base_model_prefix)  # the model without its LM head
    hidden = trunk(**model_inputs(batch, device, dtype), use_cache=False).last_hidden_state  # (B, T, C)
    labels = batch["labels"].to(device)
    target = labels[:, 1:]  # token t+1 is predicted at position t
    pos = target != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][pos]).float()  # (N_cap, V)
    nll = F.cross_entropy(logits, target[pos], reduction="none")
    row = pos.nonzero()[:, 0]
    counts = pos.sum(1)
    if (counts == 0).any():
        raise VlmquantError("a calibration sample has no caption tokens; cannot compute caption-loss gradients")
    return torch.zeros(labels.shape[0], device=device).index_add_(0, row, nll) / counts


def gradient_stats(model, adapter, samples, device, dtype, batch_size=4):
    """{site: {"vis": (L,), "cap": (L,)}} mean |grad| per layer, averaged over samples; plus token counts.

    samples: per-sample tensor dicts (io.ragged.sample); run `batch_size` at a time.
    """
    layers = adapter.layers(model)
    L, B = len(layers), len(samples)
    sums = {s: {k: torch.zeros(L, dtype=torch.float64, device=device) for k in ("vis", "cap")} for s in SITES}
    counts = {"vis": 0, "cap": 0}
    for p in model.parameters():
        p.requires_grad_(False)
    current = {}

    def grad_hook(site, i):
        def hook(module, args, output):
            output.register_hook(lambda g: accumulate(site, i, g))
        return hook

    def accumulate(site, i, g):
        a = torch.linalg.vector_norm(g.detach(), 1, dim=-1, dtype=torch.float32)  # (b, T): sum |g| over channels
        for key in ("vis", "cap"):
            m = current[key]
            per_sample = (a * m).sum(1) / (m.sum(1) * g.shape[-1]).clamp(min=1)  # mean |g| per sample
            sums[site][key][i] += per_sample.double().sum()

    handles = [adapter.site(layers[i], names).register_forward_hook(grad_hook(site, i))
               for i in range(L) for site, names in (("attn", adapter.attn_out), ("mlp", adapter.mlp_out))]
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    try:
        with lean_forwards(layers, "mlp"):
            for start in tqdm(range(0, B, batch_size), desc="grads", unit="batch"):
                part = ragged.collate(samples[start:start + batch_size])
                valid = part["attention_mask"].bool().to(device)
                current["vis"] = (part["vision_mask"].bool().to(device) & valid).float()
                current["cap"] = (part["caption_mask"].bool().to(device) & valid).float()
                counts["vis"] += int(current["vis"].sum())
                counts["cap"] += int(current["cap"].sum())
                losses = sample_losses(model, part, device, dtype)
                if not torch.isfinite(losses).all():
                    raise VlmquantError("non-finite caption loss in the gradient pass")
                losses.sum().backward()  # samples are independent: each gets its own loss's gradient
    finally:
        for h in handles:
            h.remove()
    for site in SITES:
        for key in ("vis", "cap"):
            bad = (~torch.isfinite(sums[site][key])).nonzero()
            if len(bad):
                raise VlmquantError(f"non-finite gradient at decoder layer {int(bad[0])} ({site} output, {key} tokens)")
    return {s: {k: (v / B).float().cpu() for k, v in d.items()} for s, d in sums.items()}, counts


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
