"""Modality gradient statistics → reweight ratios (DESIGN.md, algorithm step 1).

For each decoder layer's attention output projection and MLP output projection, the mean
|∂loss/∂output| over vision positions and over caption positions of each sample, averaged
over samples. loss = mean caption-token NLL of that sample. Only activation gradients are
computed: every parameter is frozen and the gradient enters at the token embeddings.
"""
import contextlib

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlmquant.errors import VlmquantError
from vlmquant.io import ragged
from vlmquant.search.capture import model_inputs

SITES = ("attn", "mlp")


class SiluMul(torch.autograd.Function):
    """silu(g) * u that saves only g and u for backward (autograd would also keep silu(g))."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * u, g), grad * F.silu(g)  # four elementwise kernels


def lean_mlp_forward(mlp):
    """Forward of a gate/up/down SiLU MLP through SiluMul; None if the MLP is of another kind."""
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")) or \
            type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLU", "SiLUActivation"):
        return None
    return lambda x: mlp.down_proj(SiluMul.apply(mlp.gate_proj(x), mlp.up_proj(x)))


def lean_norm_forward(norm):
    """A Llama-style RMSNorm through torch's fused F.rms_norm; None unless it matches the module on a probe
    (rounding aside: another formula, e.g. Gemma's 1 + weight, is far off)."""
    if not type(norm).__name__.endswith("RMSNorm") or not hasattr(norm, "variance_epsilon") or norm.weight.dim() != 1:
        return None

    def forward(x):
        return norm.weight * F.rms_norm(x, (x.shape[-1],), eps=norm.variance_epsilon)  # accumulates in fp32

    probe = torch.randn(2, norm.weight.shape[0], device=norm.weight.device, dtype=norm.weight.dtype)
    with torch.no_grad():
        return forward if torch.allclose(forward(probe).float(), norm(probe).float(), rtol=1e-2, atol=1e-3) else None


@contextlib.contextmanager
def lean_forwards(layers, mlp_name):
    """Swap each decoder layer's MLP and RMSNorm forwards for leaner ones (same math) while inside."""
    swapped = {}
    for layer in layers:
        candidates = [(layer.get_submodule(mlp_name), lean_mlp_forward)]
        candidates += [(m, lean_norm_forward) for m in layer.modules() if type(m).__name__.endswith("RMSNorm")]
        for module, make in candidates:
            fwd = make(module)
            if fwd is not None:
                swapped[module] = vars(module).get("forward")  # an instance-level forward, if any
                module.forward = fwd
    try:
        yield len(swapped)
    finally:
        for module, fwd in swapped.items():
            if fwd is None:
                del module.forward
            else:
                module.forward = fwd


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

    handles = [layers[i].get_submodule(name).register_forward_hook(grad_hook(site, i))
               for i in range(L) for site, name in (("attn", adapter.attn_out), ("mlp", adapter.mlp_out))]
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    try:
        with lean_forwards(layers, adapter.mlp_out.rsplit(".", 1)[0]):
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
