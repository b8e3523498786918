"""MBQ (arXiv 2412.19509 §3): per-group α grid search, the vision tokens' share of the loss reweighted by
the layer's gradient ratio ρ = max(vis/cap, median) (DESIGN.md algorithm steps 1-3)."""
from vlmquant.methods.base import Lazy, Method

METHOD = Method(
    name="mbq",
    summary="modality-balanced scale search: the vision-token loss reweighted by gradient ratios",
    settings=("loss", "n_grid", "reweight", "distort", "scale_cache"),
    scales=True,
    reweight=True,
    group=Lazy("vlmquant.search.grid:grid_search"),
    experts=Lazy("vlmquant.search.experts:grid_search_experts"),
)
