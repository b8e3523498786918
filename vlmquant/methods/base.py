"""What a quantization method is to the pipeline: which settings it takes, whether it makes a scale
cache (and so runs the search stage), and how it picks one scale group's scales."""
import importlib
from dataclasses import dataclass
from typing import Callable

class Lazy:
    """The function named "module:name", imported at its first call: the workflow loads the method registry
    without importing torch."""

    def __init__(self, target):
        self.target, self._fn = target, None

    def __call__(self, *args, **kwargs):
        if self._fn is None:
            module, name = self.target.split(":")
            self._fn = getattr(importlib.import_module(module), name)
        return self._fn(*args, **kwargs)


# settings every run has; a method adds the ones it reads (Method.settings)
COMMON = ("method", "w_bit", "w_group", "a_bit", "w_sym", "w_type", "formats")


@dataclass(frozen=True)
class Method:
    """A method of `runs.<name>.method`.

    name: the config value. summary: one line for the docs and the schema.
    settings: the run keys beyond COMMON that the method reads; any other key is a config error.
    Methods with scales also take `scale_cache` (a cache made elsewhere, instead of the search).
    scales: the method makes a scale cache (runs grads if reweighting, acts, search, merge).
    reweight: default of `reweight` (only methods listing it in `settings` take it).
    defaults: defaults of its own settings that the schema does not give (e.g. smoothquant's alpha).
    needs_a_bit: a one-line reason when the method only makes sense for weight-activation runs.
    group: picks one scale group's scales, (GroupSearch, RunSpec, ratio ρ or None) → GroupResult.
    experts: picks every expert's scales of a fused MoE block's per-expert group, (search.experts.ExpertsSearch,
    RunSpec, ratio) → ExpertsResult; None: the method does not search mixture-of-experts layers.
    """
    name: str
    summary: str
    settings: tuple[str, ...] = ()
    scales: bool = False
    reweight: bool = False
    defaults: tuple[tuple[str, object], ...] = ()
    needs_a_bit: str = ""
    group: Callable | None = None
    experts: Callable | None = None
