"""MBQ (arXiv 2412.19509 §3): per-group α grid search, the vision tokens' share of the loss reweighted by
the layer's gradient ratio ρ = max(vis/cap, median) (DESIGN.md algorithm steps 1-3).

Its scales: vlmquant.search.grid.search_group and search.experts.search_experts (registered there for this METHOD)."""
from vlmquant.methods.base import GPTQ_SETTINGS, Method

METHOD = Method(
    name="mbq",
    summary="modality-balanced scale search: the vision-token loss reweighted by gradient ratios",
    settings=("loss", "n_grid", "reweight", "distort", "scale_cache", "gptq", *GPTQ_SETTINGS),
    scales=True,
    reweight=True,
)
