"""SmoothQuant: s_j = max|X_j|^α / max|W_j|^(1−α), α from the config, no search. `smooth: norms` (default) smooths
the groups a norm feeds (input_layernorm → q,k,v and post_attention_layernorm → gate,up, as the reference and the
SmoothQuant paper do); `smooth: all` also the linear-fed ones (v → o, up → down).

Its scales: vlmquant.search.smooth.smooth_group (registered there for this METHOD)."""
from vlmquant.methods.base import Method

METHOD = Method(
    name="smoothquant",
    summary="scales from activation and weight maxima, no search (weight-activation runs)",
    settings=("loss", "alpha", "smooth", "distort", "scale_cache"),
    scales=True,
    defaults=(("alpha", 0.5), ("smooth", "norms")),
    needs_a_bit="smoothquant smooths activations for quantization; set a_bit (e.g. 8 for W8A8)",
)
