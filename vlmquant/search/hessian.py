"""GPTQ Hessians of a linear's calibration inputs, with MBQ's modality weights per token.

For a linear y = W x with inputs x_t (C_in,) at the calibration tokens t, GPTQ (Frantar et al. 2022,
arXiv 2210.17323, eq. 1 and Alg. 1; after OBS, Hassibi & Stork 1993, and OBQ, Frantar & Alistarh 2022,
arXiv 2208.11580) minimises the layer output error Σ_t w_t ||(W - Ŵ) x_t||², whose Hessian in each
weight row is 2 Σ_t w_t x_t x_tᵀ, i.e. up to a positive factor

    H = Σ_t w_t x_t x_tᵀ / Σ_t w_t            (C_in, C_in)

over the tokens in the calibration loss (padding excluded). Token weights w_t (`hessian` setting):
  uniform   w_t = 1 at every loss token (classic GPTQ);
  modality  w_t = ρ at vision tokens and 1 at caption (and other) loss tokens, ρ being the layer's MBQ
            reweight ratio (MBQ, arXiv 2412.19509: the same ρ its scale-search loss uses);
            per-token weighted Hessians for VLMs follow VLMQ (arXiv 2508.03351). With ρ = 1 it is uniform.
The division by Σ w_t only keeps H's scale independent of the token count: GPTQ's result does not change
when H is multiplied by a positive constant (its damping is relative to the mean diagonal).

Accumulation is streaming: `Hessian.add` takes any number of token batches, in any split, and the sum
runs in the accumulator's dtype (fp32; fp64 for tests) whatever the inputs' dtype. The rows are cast to
that dtype, scaled by √w_t and summed in one matmul, Σ (√w_t x_t)(√w_t x_t)ᵀ, so with ρ = 1 a modality
Hessian is bit for bit the uniform one.
"""
import math

import torch

from vlmquant.errors import VlmquantError

HESSIAN_MODES = ("uniform", "modality")
ROWS_PER_MATMUL = 16384  # bounds the fp32 copy of the inputs (16384 x 18944 x 4 B = 1.2 GiB)


def check_hessian_mode(mode: str, ratio: float | None) -> None:
    """Raise unless `mode` is a Hessian mode and `ratio` fits it (modality: a positive ρ)."""
    if mode not in HESSIAN_MODES:
        raise VlmquantError(f"hessian={mode!r} is not one of {', '.join(HESSIAN_MODES)}")
    if mode == "modality" and (ratio is None or not ratio > 0):
        raise VlmquantError(f"hessian=modality needs the layer's MBQ ratio ρ > 0, got {ratio!r}; "
                            "run the gradient stage (reweight) or use hessian: uniform")


class Hessian:
    """Running H = Σ w_t x_t x_tᵀ / Σ w_t of one linear input of width `n_in` (see the module doc).

    mode: "uniform" or "modality"; ratio: ρ (modality only). `add` more batches, read `value()`.
    Attributes: total (Σ w_t, float), n_tokens (number of tokens with w_t > 0).
    """

    def __init__(self, n_in: int, mode: str = "uniform", ratio: float | None = None,
                 device=None, dtype: torch.dtype = torch.float32):
        check_hessian_mode(mode, ratio)
        self.mode, self.ratio = mode, ratio
        self.sum = torch.zeros(n_in, n_in, device=device, dtype=dtype)
        self.total, self.n_tokens = 0.0, 0

    def add(self, x: torch.Tensor, loss: torch.Tensor, vision: torch.Tensor | None = None) -> None:
        """Add the tokens of x (..., C_in) where `loss` (bool, x's leading shape) is set; with mode modality,
        those where `vision` (bool, same shape) is also set count ρ times.

        Raises VlmquantError on a width or mask shape mismatch, or a modality Hessian without `vision`.
        """
        n_in = self.sum.shape[0]
        if x.shape[-1] != n_in:
            raise VlmquantError(f"Hessian input of shape {tuple(x.shape)} does not end in the linear's input width {n_in}")
        for name, mask in (("loss", loss), ("vision", vision)):
            if mask is not None and (mask.shape != x.shape[:-1] or mask.dtype != torch.bool):
                raise VlmquantError(f"Hessian {name} mask of shape {tuple(mask.shape)} and dtype {mask.dtype} does not "
                                    f"match the inputs {tuple(x.shape)}: it must be bool of shape {tuple(x.shape[:-1])}")
        if self.mode == "modality" and vision is None:
            raise VlmquantError("hessian=modality needs the vision-token mask of the calibration batch")
        x, loss = x.reshape(-1, n_in), loss.reshape(-1).to(x.device)
        rows = loss.nonzero().squeeze(1)
        root = None  # √w_t of the rows (modality); uniform rows are added as they are
        if self.mode == "modality":
            at_vision = vision.reshape(-1).to(x.device)[rows]
            root = torch.ones(rows.numel(), dtype=self.sum.dtype, device=x.device)
            root[at_vision] = math.sqrt(self.ratio)
            self.total += float(self.ratio) * int(at_vision.sum()) + rows.numel() - int(at_vision.sum())
        else:
            self.total += rows.numel()
        for start in range(0, rows.numel(), ROWS_PER_MATMUL):
            xs = x[rows[start:start + ROWS_PER_MATMUL]].to(device=self.sum.device, dtype=self.sum.dtype)
            if root is not None:
                xs.mul_(root[start:start + ROWS_PER_MATMUL, None].to(xs.device))
            self.sum.addmm_(xs.T, xs)  # (C_in, C_in): Σ (√w x)(√w x)ᵀ
        self.n_tokens += rows.numel()

    def value(self) -> torch.Tensor:
        """H (C_in, C_in) in the accumulator's dtype; zeros when no token was added."""
        return self.sum / self.total if self.total > 0 else self.sum.clone()


def expert_hessians(x: torch.Tensor, routes: torch.Tensor, n_experts: int, loss: torch.Tensor,
                    vision: torch.Tensor | None = None, mode: str = "uniform", ratio: float | None = None,
                    dtype: torch.dtype = torch.float32) -> list:
    """One Hessian per expert of a mixture-of-experts block, from the tokens routed to it.

    x: (N, C_in) the experts' common input (the gate/up projections'); routes: (N, k) long, the experts each
    token is routed to (top-k indices); loss, vision: (N,) bool as in Hessian.add. Returns `n_experts`
    Hessians; expert e's sums run over the loss tokens with e among their routes (its `n_tokens` counts them).
    The down projections' inputs differ per expert: add them to a Hessian per expert with Hessian.add.
    """
    if routes.dim() != 2 or routes.shape[0] != x.shape[0]:
        raise VlmquantError(f"expert routes of shape {tuple(routes.shape)} do not match the inputs {tuple(x.shape)}: "
                            "they must be (tokens, top_k)")
    out = []
    for e in range(n_experts):
        h = Hessian(x.shape[-1], mode, ratio, device=x.device, dtype=dtype)
        routed = (routes == e).any(dim=1)
        h.add(x, loss & routed, vision)
        out.append(h)
    return out
