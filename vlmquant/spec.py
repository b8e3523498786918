"""The run spec: one quantization run (`runs.<name>` of config.yaml), built and validated once.

Stages take a RunSpec instead of loose settings. Its `search_params` and `export_params` are what
the rules pass to the jobs, so a setting reruns exactly the stages it affects.
"""
from dataclasses import asdict, dataclass, fields, replace

from vlmquant.errors import VlmquantError
from vlmquant.methods import COMMON, METHODS, Method, get_method
from vlmquant.quant.scheme import Scheme, check_scheme

DEFAULTS = {"w_group": 128, "loss": "mae", "n_grid": 20, "distort": None, "w_sym": False, "w_type": "int"}
FORMATS = ("pseudo", "compressed-tensors")
# `distort` values (docs/fidelity.md): the reference's definition (fp-chain targets, groups in order) or this
# layer's own error only; `true` is the reference's, `false` none
DISTORTS = {None: None, False: None, True: "reference", "reference": "reference", "layer": "layer"}
# smoothquant's `smooth`: the norm-fed groups (the reference's and the paper's) or every group
SMOOTHS = ("norms", "all")


@dataclass(frozen=True)
class RunSpec:
    """A validated run. w_group -1: one group per output row; a_bit None: weight-only; w_sym: weight-only
    weights without zero point; w_type "float": FP8 E4M3 weights and activations (w_bit = a_bit = 8).

    formats: the checkpoints it exports ("pseudo", "compressed-tensors"). scale_cache: a scale cache made
    elsewhere (ours or the MBQ reference's) that replaces the search. ignore: `export.ignore` patterns
    (decoder linears the checkpoint keeps fp); a distort run's search keeps them fp too. distort: None, "reference"
    or "layer" (docs/fidelity.md). smooth: smoothquant's groups, "norms" (fed by a norm) or "all".
    """
    name: str
    method: str
    w_bit: int
    w_group: int = 128
    a_bit: int | None = None
    w_sym: bool = False
    w_type: str = "int"
    formats: tuple[str, ...] = ("pseudo",)
    scale_cache: str | None = None
    loss: str = "mae"
    n_grid: int = 20
    reweight: bool = False
    alpha: float | None = None
    distort: str | None = None
    smooth: str | None = None
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
        weight_activation = cfg.get("a_bit") is not None
        for key in ("w_group", "w_sym"):
            if weight_activation and key in cfg:
                raise VlmquantError(f"config: runs.{name}.{key}: weight-activation runs (a_bit) quantize weights "
                                    f"symmetric per output channel; remove {key}")
        if cfg.get("w_type") == "float" and (cfg["w_bit"] != 8 or cfg.get("a_bit") != 8):
            raise VlmquantError(f"config: runs.{name}.w_type: float is FP8 (E4M3) weights and activations; "
                                "set w_bit 8 and a_bit 8")
        if "scale_cache" in cfg and not method.scales:
            raise VlmquantError(f"config: runs.{name}.scale_cache: {method.name} uses no scales")
        values = {**DEFAULTS, **dict(method.defaults), "reweight": method.reweight, **cfg}
        if not isinstance(values["distort"], (bool, str, type(None))) or values["distort"] not in DISTORTS:
            raise VlmquantError(f"config: runs.{name}.distort: {values['distort']!r} is not one of true, false, "
                                "reference, layer")
        values["distort"] = DISTORTS[values["distort"]]
        if values.get("smooth", SMOOTHS[0]) not in SMOOTHS:
            raise VlmquantError(f"config: runs.{name}.smooth: {values['smooth']!r} is not one of {', '.join(SMOOTHS)}")
        if values["reweight"] and not method.reweight:
            raise VlmquantError(_unused(name, "reweight", method))
        known = {f.name for f in fields(cls)} - {"name", "ignore", "formats"}
        spec = cls(name=name, ignore=tuple(ignore), **{k: v for k, v in values.items() if k in known})
        packed = spec.packed_form()
        formats = tuple(cfg.get("formats", FORMATS if packed is None else ("pseudo",)))
        if "compressed-tensors" in formats and packed is not None:
            raise VlmquantError(f"config: runs.{name}.formats: {packed}")
        return replace(spec, formats=formats)

    @property
    def method_def(self) -> Method:
        return METHODS[self.method]

    @property
    def has_scales(self):
        """The run has a scale cache (searched or imported) and its export folds it."""
        return self.method_def.scales

    @property
    def searches(self):
        """The run's scale cache comes from its own search jobs (not from `scale_cache`)."""
        return self.has_scales and self.scale_cache is None

    @property
    def needs_grads(self):
        return self.searches and self.reweight

    @property
    def weight_activation(self):
        return self.a_bit is not None

    @property
    def scheme(self) -> Scheme:
        """How the run quantizes weights (and activations), in the search, the checkpoints and the eval."""
        fp8 = self.w_type == "float"
        return Scheme(self.w_bit, -1 if self.weight_activation else self.w_group, self.w_sym or self.weight_activation,
                      self.w_type, self.a_bit, "float" if fp8 else "int")

    def packed_form(self):
        """None when the scheme has a compressed-tensors form, else the one-line reason it has none."""
        try:
            check_scheme(self.scheme)
        except VlmquantError as e:
            return str(e)
        return None

    def config(self):
        """The settings that define the run's scales and weights: COMMON plus the method's own, but formats (a
        setting at its default-off value is left out: a_bit, alpha, scale_cache, distort None; w_sym False;
        w_type int; w_group for weight-activation runs)."""
        keys = [k for k in (*COMMON, *self.method_def.settings) if k not in ("method", "formats")]
        out = {"method": self.method}
        for k in keys:
            v = getattr(self, k)
            if (v is None or v is False) and k != "reweight" or (k == "w_type" and v == "int") \
                    or (k == "w_group" and self.weight_activation):
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
        return {**{k: v for k, v in self.config().items() if k in COMMON}, "ignore": list(self.ignore)}

    @classmethod
    def from_params(cls, name, params):
        """Back from `search_params()` / `export_params()` / `config()` (a job's params) to the spec."""
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
