"""The run spec: one quantization run (`runs.<name>` of config.yaml), built and validated once.

Stages take a RunSpec instead of loose settings. Its `search_params` and `export_params` are what
the rules pass to the jobs, so a setting reruns exactly the stages it affects.
"""
from dataclasses import asdict, dataclass, fields, replace

from vlmquant.errors import VlmquantError
from vlmquant.methods import COMMON, METHODS, Method, get_method
from vlmquant.methods.base import GPTQ_SETTINGS
from vlmquant.quant.scheme import FP4_GROUP, Scheme, check_scheme

GPTQ_CHOICES = {"hessian": ("uniform", "modality"), "gptq_inputs": ("quantized", "fp")}

DEFAULTS = {"w_group": 128, "loss": "mae", "n_grid": 20, "distort": None, "w_sym": False, "w_type": "int"}
# export.formats' default: the packed checkpoint serving loads (the eval needs no checkpoint: eval.run.RunWeights)
DEFAULT_FORMATS = ("compressed-tensors",)
# `distort` values (docs/fidelity.md): the reference's definition (fp-chain targets, groups in order) or this
# layer's own error only; `true` is the reference's, `false` none
DISTORTS = {None: None, False: None, True: "reference", "reference": "reference", "layer": "layer"}
# smoothquant's `smooth`: the norm-fed groups (the reference's and the paper's) or every group
SMOOTHS = ("norms", "all")


def default_formats(formats, packed):
    """A run's formats without runs.<name>.formats: export.formats `formats`, the pseudo checkpoint in place of the
    packed one when the scheme has no packed form (`packed`: RunSpec.packed_form's reason, else None)."""
    return tuple(dict.fromkeys("pseudo" if f == "compressed-tensors" and packed is not None else f for f in formats))


@dataclass(frozen=True)
class RunSpec:
    """A validated run. w_group -1: one group per output row; a_bit None: weight-only; w_sym: weight-only
    weights without zero point; w_type "float": FP8 E4M3 weights and activations (w_bit = a_bit = 8); "nvfp4" /
    "mxfp4": FP4 E2M1 weights in groups of 16 / 32 (w_group filled), NVFP4 W4A4 with a_bit 4 (quant/fp4.py).

    formats: the checkpoints it exports ("pseudo", "compressed-tensors"; runs.<name>.formats, else
    default_formats(export.formats)). scale_cache: a scale cache made
    elsewhere (ours or the MBQ reference's) that replaces the search. ignore: `export.ignore` patterns
    (decoder linears the checkpoint keeps fp); a distort or GPTQ run's search keeps them fp too. distort: None,
    "reference" or "layer" (docs/fidelity.md). smooth: smoothquant's groups, "norms" (fed by a norm) or "all".
    gptq: the weights are rounded with GPTQ in the search job (method gptq, or `gptq: true` on awq/mbq after
    the scales are folded); hessian ("uniform" | "modality"), dampening, act_order and gptq_inputs
    ("quantized": each layer's Hessian from the quantized previous layers' outputs | "fp") then apply, else
    they are None/False.
    """
    name: str
    method: str
    w_bit: int
    w_group: int = 128
    a_bit: int | None = None
    w_sym: bool = False
    w_type: str = "int"
    formats: tuple[str, ...] = DEFAULT_FORMATS
    scale_cache: str | None = None
    loss: str = "mae"
    n_grid: int = 20
    reweight: bool = False
    alpha: float | None = None
    distort: str | None = None
    smooth: str | None = None
    gptq: bool = False
    hessian: str | None = None
    dampening: float | None = None
    act_order: bool = False
    gptq_inputs: str | None = None
    ignore: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, name, cfg, ignore=(), formats=DEFAULT_FORMATS):
        """From `runs.<name>` (a dict, schema-checked). Fills the method's defaults and rejects settings the
        method does not read; raises VlmquantError naming `runs.<name>.<key>`. ignore, formats: `export.ignore`,
        `export.formats` (the formats of a run without its own: default_formats)."""
        method = get_method(cfg["method"])
        allowed = set(COMMON) | set(method.settings)
        for key in cfg:
            if key not in allowed:
                raise VlmquantError(_unused(name, key, method))
        if cfg.get("a_bit") is None and method.needs_a_bit:
            raise VlmquantError(f"config: runs.{name}.a_bit: {method.needs_a_bit}")
        weight_activation = cfg.get("a_bit") is not None
        fp4 = cfg.get("w_type") in FP4_GROUP
        if fp4:
            check_fp4_config(name, cfg, method)
            cfg = {**cfg, "w_group": FP4_GROUP[cfg["w_type"]]}
        for key in ("w_group", "w_sym"):
            if weight_activation and not fp4 and key in cfg:
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
        if values.get("gptq"):
            values = {"hessian": "modality" if values["reweight"] else "uniform", "dampening": 0.01,
                      "gptq_inputs": "quantized", **values}
            _check_gptq(name, values)
        else:
            for key in GPTQ_SETTINGS:
                if key in cfg:
                    raise VlmquantError(f"config: runs.{name}.{key}: only GPTQ runs use {key} (method gptq, or "
                                        "gptq: true on awq/mbq); remove it or set gptq: true")
        known = {f.name for f in fields(cls)} - {"name", "ignore", "formats"}
        spec = cls(name=name, ignore=tuple(ignore), **{k: v for k, v in values.items() if k in known})
        packed = spec.packed_form()
        if "formats" not in cfg:
            return replace(spec, formats=default_formats(formats, packed))
        if "compressed-tensors" in cfg["formats"] and packed is not None:
            raise VlmquantError(f"config: runs.{name}.formats: {packed}")
        return replace(spec, formats=tuple(cfg["formats"]))

    @property
    def method_def(self) -> Method:
        return METHODS[self.method]

    @property
    def has_scales(self):
        """The run has a scale cache (searched or imported) and its export folds it."""
        return self.method_def.scales

    @property
    def has_cache(self):
        """The run's export reads a scale cache: it has scales, or GPTQ weights (which the merge writes there)."""
        return self.has_scales or self.gptq

    @property
    def searches(self):
        """The run has search jobs: its scales are not imported (`scale_cache`), or it rounds with GPTQ."""
        return self.has_scales and self.scale_cache is None or self.gptq

    @property
    def needs_grads(self):
        return self.searches and (self.reweight or self.hessian == "modality")

    @property
    def chained(self):
        """Each search chunk starts from the quantized outputs of the previous one (distort, or GPTQ on
        quantized inputs), so a run's chunks form a chain."""
        return bool(self.distort) or (self.gptq and self.gptq_inputs == "quantized")

    @property
    def weight_activation(self):
        return self.a_bit is not None

    @property
    def scheme(self) -> Scheme:
        """How the run quantizes weights (and activations), in the search, the checkpoints and the eval."""
        if self.w_type in FP4_GROUP:  # symmetric E2M1 in the format's groups; W4A4: FP4 activations
            return Scheme(4, FP4_GROUP[self.w_type], True, self.w_type, self.a_bit,
                          "int" if self.a_bit is None else "float")
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
        distort and GPTQ runs, whose searches keep those linears fp."""
        return {**self.config(), **({"ignore": list(self.ignore)} if self.distort or self.gptq else {})}

    def export_params(self):
        """What a checkpoint depends on besides the scale cache: the quantizer, export.ignore, and for GPTQ runs
        `gptq` (the cache's weights are written) and `act_order` (the packed config says so). The search
        settings are recorded in the checkpoint through the cache's metadata."""
        keep = (*COMMON, "gptq", "act_order")
        return {**{k: v for k, v in self.config().items() if k in keep}, "ignore": list(self.ignore)}

    @classmethod
    def from_params(cls, name, params):
        """Back from `search_params()` / `export_params()` / `config()` (a job's params) to the spec."""
        params = dict(params)
        ignore = params.pop("ignore", ())
        return cls.from_config(name, params, ignore)

    def as_dict(self):
        return asdict(self)


def _check_gptq(name, values):
    """A GPTQ run's settings: integer weight-only scheme, no imported scales, valid choices."""
    where = f"config: runs.{name}"
    if values.get("a_bit") is not None or values.get("w_type", "int") != "int":
        key = "a_bit" if values.get("a_bit") is not None else "w_type"
        raise VlmquantError(f"{where}.{key}: GPTQ rounds integer weight-only schemes (W3/W4/W8); remove a_bit and "
                            "w_type or use another method")
    if values.get("scale_cache") is not None:
        raise VlmquantError(f"{where}.scale_cache: an imported scale cache has no search job for GPTQ to run in; "
                            "remove scale_cache or gptq")
    for key, choices in GPTQ_CHOICES.items():
        if values[key] not in choices:
            raise VlmquantError(f"{where}.{key}: {values[key]!r} is not one of {', '.join(choices)}")
    if isinstance(values["dampening"], bool) or not isinstance(values["dampening"], (int, float)) \
            or not values["dampening"] > 0:
        raise VlmquantError(f"{where}.dampening: {values['dampening']!r} must be a number > 0 (0.01 is standard)")
    if not isinstance(values.get("act_order", False), bool):
        raise VlmquantError(f"{where}.act_order: {values['act_order']!r} must be true or false")


def check_fp4_config(name, cfg, method):
    """One-line errors for a run with w_type nvfp4 / mxfp4 (quant/fp4.py): FP4 E2M1 weights (w_bit 4, symmetric,
    groups of 16 / 32, which w_group may omit); NVFP4 may add FP4 activations (a_bit 4), MXFP4 may not. NVFP4 W4A4
    needs its own search jobs: they calibrate the static input scales (search.act_scales)."""
    w_type, where = cfg["w_type"], f"config: runs.{name}"
    group = FP4_GROUP[w_type]
    if cfg["w_bit"] != 4:
        raise VlmquantError(f"{where}.w_bit: {w_type} is FP4 (E2M1): set w_bit 4")
    if cfg.get("w_group", group) != group:
        raise VlmquantError(f"{where}.w_group: {w_type} quantizes weights in groups of {group}: set w_group {group} "
                            "or leave it out")
    if cfg.get("w_sym", True) is not True:
        raise VlmquantError(f"{where}.w_sym: {w_type} weights are symmetric (no zero point): remove w_sym")
    if cfg.get("a_bit") is not None and (w_type != "nvfp4" or cfg["a_bit"] != 4):
        raise VlmquantError(f"{where}.a_bit: FP4 weight-activation runs are NVFP4 W4A4 (w_type nvfp4, a_bit 4); "
                            f"{w_type} takes {'a_bit 4' if w_type == 'nvfp4' else 'no a_bit (weights only)'}")
    if cfg.get("a_bit") is not None and cfg.get("distort"):
        raise VlmquantError(f"{where}.distort: NVFP4 W4A4 searches on the fp inputs only (its static input scales "
                            "are not yet carried along a distort chain); remove distort")
    if cfg.get("a_bit") is not None and (not method.scales or "scale_cache" in cfg):
        raise VlmquantError(f"{where}.{'scale_cache' if method.scales else 'method'}: NVFP4 W4A4 calibrates its static "
                            "input scales in the run's own search jobs; use method smoothquant, awq or mbq without "
                            "scale_cache")


def _unused(name, key, method):
    takers = [m.name for m in METHODS.values() if key in m.settings]
    who = f"only {', '.join(takers)} {'takes' if len(takers) == 1 else 'take'} it" if takers else "no method takes it"
    if key == "reweight":
        who = f"only {', '.join(m.name for m in METHODS.values() if m.reweight)} reweights"
    return f"config: runs.{name}.{key}: {method.name} does not use {key} ({who}); remove it"
