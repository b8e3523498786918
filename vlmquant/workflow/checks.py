"""Config checks: what the workflow tells the user about the config when it loads. The schema, the registries
(families, methods), the names the targets use, every path the config names, the calibration sets, the eval set
held out from the search sets, w_group against the models' widths; each error one line (VlmquantError) naming
the key, located at its file and YAML line, with "did you mean" for a misspelled key or choice; and one note per
setting that changes what is written without being asked for (a run that gets no packed checkpoint)."""
import contextlib
import difflib
import json
import os
import re
import sys
from pathlib import Path

import yaml

from vlmquant.data.overlap import check_disjoint
from vlmquant.errors import VlmquantError
from vlmquant.io.fingerprint import check_finite_files, fingerprints
from vlmquant.io.model_folder import check_processor_files, safetensors_header
from vlmquant.models import family_names, folder_family
from vlmquant.workflow.inputs import calib_images, demo_output, on_demo_data, weight_files

# --- one-line messages, located at the file and line that set the key ---------------------------------
KEY_ERROR = re.compile(r"config: (.+?): (.*)")  # check_config's messages: "config: <dotted key>: <what>"


def did_you_mean(word, choices):
    """' (did you mean X?)' for the choice closest to `word` (difflib), or ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def schema_error(config, schema):
    """The one-line message of the most useful of the schema's errors in `config`, or None: an unknown key first
    (with the closest known key: a misspelled required key is also reported missing), then jsonschema's best
    match."""
    import jsonschema

    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(config))
    unknown = [e for e in errors if e.validator == "additionalProperties" and isinstance(e.instance, dict)]
    error = unknown[0] if unknown else jsonschema.exceptions.best_match(errors)
    if error is None:
        return None
    where = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties":
        known = error.schema.get("properties", {})
        extra = next(k for k in error.instance if k not in known)
        return f"config: {'.'.join([*where, str(extra)])}: unknown key{did_you_mean(extra, known)}"
    if "propertyNames" in error.absolute_schema_path:
        return (f"config: {'.'.join([*where, str(error.instance)])}: names become folder names: use letters, digits "
                "and - _ . only, starting with a letter or digit")
    return f"config: {'.'.join(where) or '(top level)'}: {error.message}"


def _pairs(node):
    """[(key, (line, pairs of the value))] of a composed YAML mapping or sequence node (1-based lines; a list item's
    key is its index, as in the schema's messages) or of a dict or list (line None); None for anything else."""
    if isinstance(node, yaml.MappingNode):
        return [(k.value, (k.start_mark.line + 1, _pairs(v))) for k, v in node.value if isinstance(k, yaml.ScalarNode)]
    if isinstance(node, yaml.SequenceNode):
        return [(str(i), (v.start_mark.line + 1, _pairs(v))) for i, v in enumerate(node.value)]
    if isinstance(node, dict):
        return [(str(k), (None, _pairs(v))) for k, v in node.items()]
    if isinstance(node, list):
        return [(str(i), (None, _pairs(v))) for i, v in enumerate(node)]
    return None


def _find(pairs, dotted):
    """(whole key found, levels found, line of the deepest level found) of a dotted key path in `pairs`. Names
    may hold dots (a run `w4.5`): at each level, the longest key that starts the rest of the path."""
    depth, line, rest = 0, None, dotted
    while rest and pairs:
        match = [(k, v) for k, v in pairs if rest == k or rest.startswith(f"{k}.")]
        if not match:
            break
        key, (line, pairs) = max(match, key=lambda kv: len(kv[0]))
        depth, rest = depth + 1, rest[len(key) + 1:]
    return not rest, depth, line


def key_line(path, dotted):
    """_find in the YAML file `path`: (whole key found, levels found, 1-based line of the deepest); (False, 0,
    None) for a missing or unreadable file."""
    try:
        root = yaml.compose(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False, 0, None
    return _find(_pairs(root), dotted)


def locate(message, files, overrides=None):
    """A check_config message ('config: <key>: <what>') with 'config' replaced by where the key is set: the
    file (and 'line N') that sets it, `files` in rising precedence (config.yaml, then each --configfile),
    or '--config' when the command line sets it. Other messages come back unchanged."""
    m = KEY_ERROR.fullmatch(message)
    if not m or not files:
        return message
    key, what = m.groups()
    if overrides and _find(_pairs(overrides), key)[0]:
        return f"--config: {key}: {what}"
    # the highest-precedence file holding the whole key, else the one holding most of its levels
    found = [(key_line(f, key), i, f) for i, f in enumerate(files) if Path(f).is_file()]
    if not found:
        return message
    (_, _, line), _, file = max(found, key=lambda r: (*r[0][:2], r[1]))
    shown = os.path.relpath(file) if Path(file).resolve().is_relative_to(Path.cwd()) else file
    return f"{shown}: line {line}: {key}: {what}" if line else f"{shown}: {key}: {what}"


@contextlib.contextmanager
def config_errors(files, overrides=None):
    """Inside the block, a VlmquantError ends the process with its one line (located) on stderr and exit
    status 1, instead of Snakemake's header and internal frames."""
    try:
        yield
    except VlmquantError as e:
        print(locate(str(e), files, overrides), file=sys.stderr)
        sys.exit(1)


def notes(config):
    """One line per target run whose written files differ from what the run's settings alone suggest:
    no packed checkpoint because its scheme has no compressed-tensors form (formats unset)."""
    from vlmquant.spec import RunSpec

    out = []
    for name in config["targets"].get("runs", []):
        run = config["runs"][name]
        reason = RunSpec.from_config(name, run).packed_form()
        if reason and "formats" not in run and "compressed-tensors" in config["export"]["formats"]:
            why = reason.split(": ", 1)[-1]  # without the scheme's fields
            out.append(f"note: runs.{name}: writes checkpoint/ (pseudo) only, no packed/: {why} "
                       "(set formats: [pseudo] to drop this note)")
    return out


def print_notes(config):
    """The notes on stderr, one line each (the workflow prints them once, in the main process)."""
    for line in notes(config):
        print(line, file=sys.stderr)


# --- the checks -------------------------------------------------------------------------------------
def check_yaml(path):
    """A YAML syntax error in `path` as one line with its line and column (Snakemake's own message has
    neither). A missing file is left to Snakemake."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise VlmquantError(f"{path}: {where}{problem} (YAML syntax)") from None


def check_choice(key, value, choices):
    """A registry-backed choice (family, method): one line naming the key, as the schema's enums do."""
    if value not in choices:
        raise VlmquantError(f"config: {key}: {value!r} is not one of {sorted(choices)}{did_you_mean(value, choices)}")


def check_config(config, schema_path):
    """Validate against the schema (one-line error naming the key), fill defaults, cross-check names.

    Fills `models.<name>.family` from the folder when absent, and normalises every run to its
    RunSpec's settings (RunSpec.config), so equal runs give equal rule params.
    """
    from snakemake.utils import validate

    from vlmquant.methods import METHODS
    from vlmquant.spec import RunSpec

    with open(schema_path) as f:
        schema = yaml.safe_load(f)
    error = schema_error(config, schema)
    if error is not None:
        raise VlmquantError(error)
    validate(config, str(schema_path), set_default=True)
    for name, cfg in config["models"].items():
        if "family" in cfg:
            check_choice(f"models.{name}.family", cfg["family"], family_names())
        cfg.setdefault("family", folder_family(cfg["path"], f"config: models.{name}.path"))
    for name, run in config["runs"].items():
        check_choice(f"runs.{name}.method", run["method"], METHODS)
    for name, run in config["runs"].items():
        # RunSpec.config leaves out formats (no setting of the weights), which says what checkpoints to write
        formats = {"formats": run["formats"]} if "formats" in run else {}
        config["runs"][name] = {**RunSpec.from_config(name, run).config(), **formats}
    for kind in ("models", "calib", "runs"):
        for name in config["targets"].get(kind, []):
            if name not in config[kind]:
                raise VlmquantError(f"config: targets.{kind}: {name!r} is not defined under '{kind}'")
    for name, cfg in config["calib"].items():
        if cfg["format"] == "interleave" and "text" not in cfg:
            raise VlmquantError(f"config: calib.{name}.text: format interleave needs a text corpus file")
    eval_calib = config["eval"]["calib"]
    if eval_calib not in config["calib"]:
        raise VlmquantError(f"config: eval.calib: {eval_calib!r} is not defined under 'calib' "
                            "(name a held-out calibration set, disjoint from the search sets)")
    if config["calib"][eval_calib]["format"] == "text":
        raise VlmquantError(f"config: calib.{eval_calib}.format: the eval set (eval.calib) has no images in format "
                            "text, so its vision metrics are empty and the held-out check (by image) cannot run; "
                            "use plain")
    check_paths(config)
    check_w_groups(config)
    check_expert_schemes(config)
    if eval_calib in config["targets"].get("calib", []) and not config["eval"]["allow_overlap"]:
        raise VlmquantError(f"config: eval.calib: {eval_calib!r} is also a search set (targets.calib); evaluate on "
                            "held-out images, or set eval.allow_overlap: true")
    return config


def check_paths(config):
    """Every file and folder the config names exists (the demo rules' outputs excepted): one line naming
    the key and the path. Without this, Snakemake keeps results whose inputs are gone ("Nothing to be
    done") and drops the other edits made with the bad path."""
    def need(key, path, kind):
        if demo_output(path):
            return
        ok = Path(path).is_dir() if kind == "folder" else Path(path).is_file()
        if not ok:
            what = "not found" if not Path(path).exists() else f"is not a {kind}"
            raise VlmquantError(f"config: {key}: {path} {what}")

    for name, cfg in config["models"].items():
        if demo_output(cfg["path"]) and not Path(cfg["path"]).is_dir():
            continue  # built by the demo rules; once built, checked as any folder
        need(f"models.{name}.path", cfg["path"], "folder")
        if not (Path(cfg["path"]) / "config.json").is_file():
            raise VlmquantError(f"config: models.{name}.path: {cfg['path']} has no config.json (not a model folder)")
        if not weight_files(cfg["path"]):
            raise VlmquantError(f"config: models.{name}.path: {cfg['path']} has no *.safetensors weights")
        try:  # tokenizer, processor and chat template; every shard as long as its header says
            check_processor_files(cfg["path"])
            for f in weight_files(cfg["path"]):
                if f.endswith(".safetensors"):
                    safetensors_header(f)
        except VlmquantError as e:
            raise VlmquantError(f"config: models.{name}.path: {e}") from None
    for name, cfg in config["calib"].items():
        need(f"calib.{name}.captions", cfg["captions"], "file")
        need(f"calib.{name}.images", cfg["images"], "folder")
        if cfg.get("text"):
            need(f"calib.{name}.text", cfg["text"], "file")
    for name, run in config["runs"].items():
        if run.get("scale_cache"):
            need(f"runs.{name}.scale_cache", run["scale_cache"], "file")


def check_models(config):
    """At load, every target model not built by the demo rules: its weights hold only finite values (one line
    naming the file, tensor and count). This reads each shard once per file version (io.fingerprint)."""
    for name in config["targets"].get("models", []):
        path = config["models"][name]["path"]
        if not demo_output(path):
            try:
                check_finite_files([f for f in weight_files(path) if f.endswith(".safetensors")])
            except VlmquantError as e:
                raise VlmquantError(f"config: models.{name}.path: {e}") from None


def source_hashes(cfg, name):
    """{sha256: file} of the images calibration set `name` uses, from its source files."""
    return {sha: f for f, sha in fingerprints(calib_images(cfg, name)).items()}


def check_calib_sets(config):
    """At load, for every calibration set in use (targets.calib, eval.calib) not on the demo's data: its
    source is read and every image its rows use exists (what calib_sources lists), and eval.calib shares
    no image with a target set (by content). Snakemake ignores errors raised inside input functions when
    the output exists already, so anything an input function could raise is raised here first.
    Sets on demo data are checked by the eval on the calibration Parquets (eval.run.run_eval, held_out)."""
    e = config["eval"]["calib"]
    used = dict.fromkeys([*config["targets"].get("calib", []), e])
    for name in used:
        if not on_demo_data(config["calib"][name]):
            calib_images(config["calib"][name], name)
    if on_demo_data(config["calib"][e]):
        return
    for c in config["targets"].get("calib", []):
        if c != e and not on_demo_data(config["calib"][c]):
            check_disjoint(e, source_hashes(config["calib"][e], e), c, source_hashes(config["calib"][c], c),
                           config["eval"]["allow_overlap"])


# --- w_group ------------------------------------------------------------------------------------------
GROUP_MULTIPLE = 16  # w_group: -1, or a positive multiple of this


def quantized_widths(model_cfg):
    """{input width: config key} of the language decoder's linears, from config.json (the text config):
    hidden_size (q, k, v, gate, up), heads × head_dim (o), intermediate_size (down), and the MoE and
    linear-attention widths where the config has them. A demo model not built yet: the demo's sizes."""
    path = Path(model_cfg["path"])
    if (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        cfg = cfg.get("text_config") or cfg.get("llm_config") or cfg
    else:
        from vlmquant.demo.sizes import TEXT_SIZES  # demo paths only (check_paths has checked the others)

        cfg = TEXT_SIZES
    widths = {}
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    head_dim = cfg.get("head_dim") or (hidden // heads if hidden and heads else None)
    keys = {"hidden_size": hidden, "num_attention_heads × head_dim": heads * head_dim if heads and head_dim else None,
            "intermediate_size": cfg.get("intermediate_size"), "moe_intermediate_size": cfg.get("moe_intermediate_size"),
            "shared_expert_intermediate_size": cfg.get("shared_expert_intermediate_size")}
    if cfg.get("linear_num_value_heads") and cfg.get("linear_value_head_dim"):
        keys["linear_num_value_heads × linear_value_head_dim"] = cfg["linear_num_value_heads"] * cfg["linear_value_head_dim"]
    for key, width in keys.items():
        if isinstance(width, int) and width > 0:
            widths.setdefault(width, key)
    return widths


def check_expert_schemes(config):
    """NVFP4 W4A4 (w_type nvfp4 with a_bit) on a target model of a mixture-of-experts family is refused at load,
    naming the run and the model: the search calibrates no static input scales for fused experts yet (it would
    stop in the first MoE layer's search job, after grads and acts)."""
    from vlmquant.models import get_adapter
    from vlmquant.spec import RunSpec

    for name in config["targets"].get("runs", []):
        spec = RunSpec.from_config(name, config["runs"][name])
        if spec.scheme.w_type != "nvfp4" or spec.a_bit is None:
            continue
        for m in config["targets"].get("models", []):
            family = config["models"][m]["family"]
            if any(g.experts for groups in get_adapter(family).groups.values() for g in groups):
                raise VlmquantError(f"config: runs.{name}: NVFP4 W4A4 is not supported on model {m!r} ({family}, "
                                    "mixture of experts): no static input scales for fused experts yet; drop a_bit "
                                    "(NVFP4A16) or the model from targets")


def check_w_groups(config):
    """Every weight-only run's w_group is -1 or a positive multiple of GROUP_MULTIPLE, and divides every
    quantized input width of every target model (quantized_widths), so a bad group fails at load, not
    inside a search or export job. One line naming the run, the key and the width."""
    from vlmquant.spec import RunSpec

    targets = set(config["targets"].get("runs", []))
    for name, run in config["runs"].items():
        spec = RunSpec.from_config(name, run)
        if spec.weight_activation:
            continue
        g = spec.w_group
        if g != -1 and (g <= 0 or g % GROUP_MULTIPLE):
            raise VlmquantError(f"config: runs.{name}.w_group: {g} is not supported; use -1 (one group per output "
                                f"row) or a positive multiple of {GROUP_MULTIPLE} (32, 64 and 128 are served by vLLM)")
        if g == -1 or name not in targets:
            continue
        for m in config["targets"].get("models", []):
            widths = quantized_widths(config["models"][m])
            for width, key in widths.items():
                if width % g:
                    fits = [d for d in (16, 32, 64, 128, 256) if all(w % d == 0 for w in widths)]
                    raise VlmquantError(f"config: runs.{name}.w_group: {g} does not divide {key} = {width} of model "
                                        f"{m!r}; use -1" + (f" or one of {fits}" if fits else ""))
