"""Static input scales of NVFP4 W4A4 runs, calibrated in the search job (issue 27).

NVFP4 W4A4 serving quantizes every quantized linear's input per token and group of 16 against one static FP32
global input scale per linear, 448 x 6 / amax(|x|) over calibration data (quant/fp4.py). The search job sees every
decoder layer's calibration inputs: during the layer's recording forward (search/records.py) each quantized
linear's input is reduced to max |x| per channel over the valid (non-padding) tokens, and once the layer's scales
are searched, amax of the input the scaled model gives that linear is max_c(max|x_c| / s_c) for a consumer of a
scale group (its input is divided by the group's s), max_c max|x_c| otherwise. These amax values go into the layer
file's metadata, the merged scale cache (io.scales.merge) and from there into both checkpoints
(export.checkpoint, export.packed), so the search, the pseudo checkpoint's eval and the packed folder use the
same scale. Linears that vLLM fuses (q/k/v, gate/up) share their input, hence their amax and global scale.
"""
import contextlib

import torch


@contextlib.contextmanager
def input_maxima(named, valid):
    """While inside, forward pre-hooks record max |x| per input channel of each linear [(name, module)] over the
    valid tokens (valid: (N, T) bool, the samples in order) of the first N samples it is called on (micro-batches
    in order, as record_layer runs them); later calls (the grid search's block forwards) are not recorded.
    Yields {name: (C_in,) max in the input's dtype}, filled as the forwards run."""
    maxima, seen, handles = {}, {}, []
    n = valid.shape[0]

    def hook(name):
        def record(module, args):
            start = seen.get(name, 0)
            x = args[0]
            if start >= n:
                return
            b = x.shape[0]
            keep = valid[start:start + b].to(x.device)
            seen[name] = start + b
            if not keep.any():
                return
            m = x.detach()[keep].abs().amax(0)  # (C_in,)
            maxima[name] = m if name not in maxima else torch.maximum(maxima[name], m)
        return record

    for name, lin in named:
        handles.append(lin.register_forward_pre_hook(hook(name)))
    try:
        yield maxima
    finally:
        for h in handles:
            h.remove()


def input_amax(maxima, groups, results, prefix):
    """{prefix + linear name: amax (float) of its input in the scaled model} (see the module doc) from input_maxima's
    {name: (C_in,)} and the layer's scale groups (their `linears`) and searched results (their `scales` (C_in,))."""
    scales = {name: r.scales for g, r in zip(groups, results) for name in g.linears if name in maxima}
    out = {}
    for name, m in maxima.items():
        m = m.float()
        if name in scales:
            m = m / scales[name].float().to(m.device)
        out[prefix + name] = float(m.amax())
    return out
