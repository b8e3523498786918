"""AWQ on multimodal data: the same α grid search as MBQ, every valid token weighted alike (no reweight)."""
from vlmquant.methods.base import Lazy, Method

METHOD = Method(
    name="awq",
    summary="activation-aware scale search, every token weighted alike",
    settings=("loss", "n_grid", "distort", "scale_cache"),
    scales=True,
    group=Lazy("vlmquant.search.grid:grid_search"),
    experts=Lazy("vlmquant.search.experts:grid_search_experts"),
)
