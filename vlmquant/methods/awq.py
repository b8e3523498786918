"""AWQ on multimodal data: the same α grid search as MBQ, every valid token weighted alike (no reweight).

Its scales: vlmquant.search.grid.search_group and search.experts.search_experts (registered there for this METHOD)."""
from vlmquant.methods.base import GPTQ_SETTINGS, Method

METHOD = Method(
    name="awq",
    summary="activation-aware scale search, every token weighted alike",
    settings=("loss", "n_grid", "distort", "scale_cache", "gptq", *GPTQ_SETTINGS),
    scales=True,
)
