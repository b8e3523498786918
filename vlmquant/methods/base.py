"""What a quantization method is to the pipeline: which settings it takes, whether it makes a scale cache
(and so runs the search stage), and which functions pick its scales.

This module imports no torch, so the workflow reads the registry when it loads. The search functions
register themselves for their methods with a decorator where they are defined, as torchao's quantization
API registers a transform per config type:

    @register_group_search(mbq.METHOD, awq.METHOD)
    def search_group(job: GroupSearch, spec: RunSpec) -> GroupResult: ...

so "go to definition" leads from the method to its code and back. The search (vlmquant.search.plan) imports
the modules that hold them and looks them up per scale group (`group_search_of`, `experts_search_of`).
"""
from dataclasses import dataclass
from typing import Callable

from vlmquant.errors import VlmquantError

# settings every run has; a method adds the ones it reads (Method.settings)
COMMON = ("method", "w_bit", "w_group", "a_bit", "w_sym", "w_type", "formats")
# settings of GPTQ rounding (method gptq, and awq/mbq with `gptq: true`): vlmquant.search.gptq_layer
GPTQ_SETTINGS = ("hessian", "dampening", "act_order", "gptq_inputs")


@dataclass(frozen=True)
class Method:
    """A method of `runs.<name>.method`.

    name: the config value. summary: one line for the docs and the schema.
    settings: the run keys beyond COMMON that the method reads; any other key is a config error.
    Methods with scales also take `scale_cache` (a cache made elsewhere, instead of the search).
    scales: the method makes a scale cache (runs grads if reweighting, acts, search, merge); it then registers a
    group search (register_group_search) and, if it searches mixture-of-experts layers, an experts search.
    reweight: default of `reweight` (only methods listing it in `settings` take it).
    defaults: defaults of its own settings that the schema does not give (e.g. smoothquant's alpha).
    needs_a_bit: a one-line reason when the method only makes sense for weight-activation runs.
    """
    name: str
    summary: str
    settings: tuple[str, ...] = ()
    scales: bool = False
    reweight: bool = False
    defaults: tuple[tuple[str, object], ...] = ()
    needs_a_bit: str = ""


# method name → its function of one scale group, (search.grid.GroupSearch, RunSpec) → search.grid.GroupResult
GROUP_SEARCHES: dict[str, Callable] = {}
# method name → its function of a fused MoE block's per-expert group, (search.experts.ExpertsSearch, RunSpec)
# → search.experts.ExpertsResult; a method without one does not search mixture-of-experts layers
EXPERTS_SEARCHES: dict[str, Callable] = {}


def register_group_search(*methods: Method):
    """Decorator: the function picks one scale group's scales for `methods`."""
    def register(fn):
        GROUP_SEARCHES.update({m.name: fn for m in methods})
        return fn
    return register


def register_experts_search(*methods: Method):
    """Decorator: the function picks every expert's scales of a fused MoE block for `methods`."""
    def register(fn):
        EXPERTS_SEARCHES.update({m.name: fn for m in methods})
        return fn
    return register


def group_search_of(method: Method) -> Callable:
    """The registered group search of a method with scales; raises VlmquantError when there is none."""
    if method.name not in GROUP_SEARCHES:
        raise VlmquantError(f"method {method.name} makes scales but registers no group search "
                            "(methods.base.register_group_search in a module vlmquant.search.plan imports)")
    return GROUP_SEARCHES[method.name]


def experts_search_of(method: Method) -> Callable:
    """The registered experts search of a method; raises VlmquantError when it does not search MoE layers."""
    if method.name not in EXPERTS_SEARCHES:
        raise VlmquantError(f"method {method.name} does not search the experts of mixture-of-experts layers")
    return EXPERTS_SEARCHES[method.name]
