"""AWQ on multimodal data: the same α grid search as MBQ, every valid token weighted alike (no reweight)."""
from vlmquant.methods.base import Method
from vlmquant.search.experts import grid_search_experts
from vlmquant.search.grid import grid_search

METHOD = Method(
    name="awq",
    summary="activation-aware scale search, every token weighted alike",
    settings=("loss", "n_grid", "distort", "scale_cache"),
    scales=True,
    group=grid_search,
    experts=grid_search_experts,
)
