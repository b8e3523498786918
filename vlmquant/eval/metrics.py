"""Metric math of the eval stage, on plain tensors.

- caption NLL / perplexity: mean negative log-likelihood of the caption tokens (token-weighted
  over the whole eval set); PPL = exp(NLL).
- KL(fp ‖ quantized) of the next-token distribution at every caption prediction position. The fp
  side is stored as its top-k log-probs; the rest of the vocabulary is one extra bucket, so with
  k < vocabulary size this is the KL of the coarsened distributions — a lower bound of the exact
  KL (exact when k covers the vocabulary).
- hidden-state error: relative MSE Σ‖h_q − h_fp‖² / Σ‖h_fp‖² of a decoder layer's output over a
  fixed set of positions, separately for vision (image-token) and text positions.
- weight error: relative Frobenius error of a layer's linear weights (see `weight_error`).
"""
import torch


def caption_positions(labels):
    """(rows, cols) of the positions that predict a caption token: labels[b, t + 1] != -100."""
    target = labels[:, 1:]
    rows, cols = (target != -100).nonzero(as_tuple=True)
    return rows, cols, target[rows, cols]


def select_positions(valid, vision, per_modality):
    """Positions (sorted) of one sample where hidden states are compared, and which of them are vision.

    Up to `per_modality` evenly spaced vision positions and as many text (non-vision, non-padding)
    positions; `per_modality <= 0` keeps every position. valid, vision: (T,) bool, the sample's
    models.capture.token_masks (vision tokens among the valid ones).
    """
    picked = []
    for mask in (vision, valid & ~vision):
        idx = mask.nonzero()[:, 0]
        if 0 < per_modality < idx.numel():
            idx = idx[torch.linspace(0, idx.numel() - 1, per_modality).round().long().unique()]
        picked.append(idx)
    pos = torch.cat(picked).sort().values
    return pos, vision[pos]


def kl_topk(ref_idx, ref_logp, logq, ref_rest=None):
    """KL(p ‖ q) per position, p given by its top-k (ref_idx, ref_logp: (N, k)), q by logq (N, V).

    The vocabulary outside p's top-k is merged into one bucket on both sides (exact when k = V).
    ref_rest (N,): log of p's mass outside the top-k, computed from the full distribution (1 − Σ
    top-k would cancel catastrophically); q's is summed directly from logq. float64; returns (N,) ≥ 0.
    """
    idx = ref_idx.long()
    lp = ref_logp.double()
    lq_all = logq.double()
    lq = lq_all.gather(1, idx)  # (N, k)
    kl = (lp.exp() * (lp - lq)).sum(1)
    if idx.shape[1] < logq.shape[1]:
        if ref_rest is None:
            raise ValueError("kl_topk: k < vocabulary needs p's rest mass (ref_rest)")
        lp_rest = ref_rest.double()
        lq_rest = lq_all.scatter(1, idx, float("-inf")).logsumexp(1)
        p_rest = lp_rest.exp()
        kl = kl + torch.where(p_rest > 0, p_rest * (lp_rest - lq_rest), torch.zeros_like(kl))
    return kl.clamp(min=0)


def rest_logmass(logp, idx):
    """log Σ exp(logp) over the entries not in idx, per row (−inf when idx covers the row)."""
    return logp.scatter(1, idx.long(), float("-inf")).logsumexp(1)


class ErrorSums:
    """Running Σ‖a − b‖² and Σ‖b‖² per key; `relative()` gives their ratio."""

    def __init__(self):
        self.num, self.den = {}, {}

    def add(self, key, approx, ref):
        d = approx.double() - ref.double()
        self.num[key] = self.num.get(key, 0.0) + float((d * d).sum())
        self.den[key] = self.den.get(key, 0.0) + float(ref.double().square().sum())

    def relative(self, key):
        den = self.den.get(key, 0.0)
        return self.num.get(key, 0.0) / den if den > 0 else float("nan")


def weight_scale_factors(entries):
    """{linear name: (row factor (out,) or None, column factor (in,) or None)} of folded scale entries.

    Folding multiplies a linear's input columns by s when it is in a group's linears, and divides
    its last len(s) output rows by s when it is a group's previous op; the stored weight is
    Q(diag(row) · W · diag(col)).
    """
    cols, rows = {}, {}
    for prev, linears, s in entries:
        s = s.double()
        for name in linears:
            cols[name] = cols[name] * s if name in cols else s.clone()
        rows.setdefault(prev, []).append(s)
    return cols, rows


def weight_error(w_fp, w_q, col=None, row_scales=(), block_elems=1 << 25):
    """(Σ‖ΔW‖², Σ‖W‖²) in the original basis and in the scaled basis, for one linear.

    w_fp: original fp weight (out, in); w_q: the checkpoint's weight = Q(W_scaled);
    W_scaled = diag(row) · w_fp · diag(col). Original basis: Q unfolded, diag(1/row) · w_q ·
    diag(1/col), vs w_fp (comparable across runs). Scaled basis: w_q vs W_scaled (the rounding
    error of the stored weights alone). float64 on w_q's device, in blocks of rows of about
    `block_elems` elements (bounded memory for large linears).
    """
    device = w_q.device
    n_out, n_in = w_fp.shape
    row = torch.ones(n_out, dtype=torch.float64, device=device)
    for s in row_scales:
        row[-s.numel():] /= s.double().to(device)
    col = torch.ones(n_in, dtype=torch.float64, device=device) if col is None else col.double().to(device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    step = max(1, block_elems // max(n_in, 1))
    for a in range(0, n_out, step):
        w = w_fp[a:a + step].to(device).double()
        r = row[a:a + step, None]
        scaled = r * w * col[None, :]
        q = w_q[a:a + step].double()
        unfolded = q / (r * col[None, :])
        sums += torch.stack([(unfolded - w).square().sum(), w.square().sum(), (q - scaled).square().sum(),
                             scaled.square().sum()])
    return tuple(sums.tolist())
