"""The run spec: one quantization run (`runs.<name>` of config.yaml), built and validated once.

Stages take a RunSpec instead of loose settings. Its `search_params` and `export_params` are what
the rules pass to the jobs, so a setting reruns exactly the stages it affects.
"""
from dataclasses import asdict, dataclass, fields

from vlmquant.errors import VlmquantError
from vlmquant.methods import COMMON, METHODS, Method, get_method

DEFAULTS = {"w_group": 128, "loss": "mae", "n_grid": 20, "distort": False}


@dataclass(frozen=True)
class RunSpec:
    """A validated run. w_group -1: one group per output row; a_bit None: weight-only.

    ignore: `export.ignore` patterns (decoder linears the checkpoint keeps fp); a distort run's search
    keeps them fp too.
    """
    name: str
    method: str
    w_bit: int
    w_group: int = 128
    a_bit: int | None = None
    loss: str = "mae"
    n_grid: int = 20
    reweight: bool = False
    alpha: float | None = None
    distort: bool = False
    ignore: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, name, cfg, ignore=()):
        """From `runs.<name>` (a dict, schema-checked). Fills the method's defaults and rejects settings the
        method does not read; raises VlmquantError naming `runs.<name>.<key>`."""
        method = get_method(cfg["method"])
        allowed = set(COMMON) | set(method.settings)
        for key in cfg:
            if key not in allowed:
                raise VlmquantError(_unused(name, key, method))
        if cfg.get("a_bit") is None and method.needs_a_bit:
            raise VlmquantError(f"config: runs.{name}.a_bit: {method.needs_a_bit}")
        if cfg.get("a_bit") is not None and "w_group" in cfg:
            raise VlmquantError(f"config: runs.{name}.w_group: weight-activation runs (a_bit) quantize weights per "
                                "output channel; remove w_group")
        values = {**DEFAULTS, **dict(method.defaults), "reweight": method.reweight, **cfg}
        if values["reweight"] and not method.reweight:
            raise VlmquantError(_unused(name, "reweight", method))
        known = {f.name for f in fields(cls)} - {"name", "ignore"}
        return cls(name=name, ignore=tuple(ignore), **{k: v for k, v in values.items() if k in known})

    @property
    def method_def(self) -> Method:
        return METHODS[self.method]

    @property
    def has_scales(self):
        """The run makes a scale cache: it has search jobs and its export folds scales."""
        return self.method_def.scales

    @property
    def needs_grads(self):
        return self.has_scales and self.reweight

    @property
    def weight_activation(self):
        return self.a_bit is not None

    def config(self):
        """The settings that define the run: COMMON plus the method's own (a_bit and alpha only when set,
        distort only when true, w_group not for weight-activation runs)."""
        keys = [k for k in (*COMMON, *self.method_def.settings) if k != "method"]
        out = {"method": self.method}
        for k in keys:
            v = getattr(self, k)
            if v is None or (k == "distort" and not v) or (k == "w_group" and self.weight_activation):
                continue
            out[k] = v
        return out

    def search_params(self):
        """What a search job's output depends on (rule params): the run's settings, plus export.ignore for
        distort runs, whose forwards to the next layer keep those linears fp."""
        return {**self.config(), **({"ignore": list(self.ignore)} if self.distort else {})}

    def export_params(self):
        """What a checkpoint depends on besides the scale cache: the quantizer and export.ignore. The search
        settings are recorded in the checkpoint through the cache's metadata."""
        out = {"method": self.method, "w_bit": self.w_bit, "ignore": list(self.ignore)}
        out.update({"a_bit": self.a_bit} if self.weight_activation else {"w_group": self.w_group})
        return out

    @classmethod
    def from_params(cls, name, params):
        """Back from `search_params()` / `config()` (a job's params) to the spec."""
        params = dict(params)
        ignore = params.pop("ignore", ())
        return cls.from_config(name, params, ignore)

    def as_dict(self):
        return asdict(self)


def _unused(name, key, method):
    takers = [m.name for m in METHODS.values() if key in m.settings]
    who = f"only {', '.join(takers)} {'takes' if len(takers) == 1 else 'take'} it" if takers else "no method takes it"
    if key == "reweight":
        who = f"only {', '.join(m.name for m in METHODS.values() if m.reweight)} reweights"
    return f"config: runs.{name}.{key}: {method.name} does not use {key} ({who}); remove it"
