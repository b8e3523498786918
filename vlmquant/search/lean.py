"""Speed tricks of the gradient pass: leaner forwards of a decoder layer's MLP and RMSNorms with the
same math (fewer saved tensors and kernels under autograd). vlmquant/search/grads.py states the
algorithm; it swaps these in while it runs.
"""
import contextlib

import torch
import torch.nn.functional as F


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
