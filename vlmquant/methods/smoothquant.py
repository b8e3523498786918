"""SmoothQuant: s_j = max|X_j|^α / max|W_j|^(1−α), α from the config, no search.

Its scales: vlmquant.search.smooth.smooth_group (registered there for this METHOD)."""
from vlmquant.methods.base import Method

METHOD = Method(
    name="smoothquant",
    summary="scales from activation and weight maxima, no search (weight-activation runs)",
    settings=("loss", "alpha", "distort", "scale_cache"),
    scales=True,
    defaults=(("alpha", 0.5),),
    needs_a_bit="smoothquant smooths activations for quantization; set a_bit (e.g. 8 for W8A8)",
)
