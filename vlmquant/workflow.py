"""Glue between Snakemake and the library: config checks, targets, script entry points."""
import contextlib
import logging
import sys

import yaml

from vlmquant.errors import VlmquantError


def check_config(config, schema_path):
    """Validate against the schema (one-line error naming the key), fill defaults, cross-check names."""
    import jsonschema
    from snakemake.utils import validate

    with open(schema_path) as f:
        schema = yaml.safe_load(f)
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise VlmquantError(f"config: {key}: {error.message}")
    validate(config, str(schema_path), set_default=True)
    for kind in ("models", "calib"):
        for name in config["targets"].get(kind, []):
            if name not in config[kind]:
                raise VlmquantError(f"config: targets.{kind}: {name!r} is not defined under '{kind}'")
    for name, cfg in config["calib"].items():
        if cfg["format"] == "interleave" and "text" not in cfg:
            raise VlmquantError(f"config: calib.{name}.text: format interleave needs a text corpus file")
    return config


def targets(config):
    """Files `rule all` asks for."""
    t = config["targets"]
    return [f"results/{m}/{c}/inputs.safetensors" for m in t.get("models", []) for c in t.get("calib", [])]


@contextlib.contextmanager
def script_logging(snakemake):
    """Route logging and stderr (tqdm) to the rule's log; turn VlmquantError into a one-line exit."""
    log_path = snakemake.log[0] if snakemake.log else None
    stream = open(log_path, "w") if log_path else sys.stderr
    handler = logging.StreamHandler(stream)
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    real_stderr = sys.stderr
    sys.stderr = stream
    try:
        yield
    except VlmquantError as e:
        print(f"error: {e}", file=stream)
        print(f"error: {e}", file=real_stderr)
        sys.exit(1)
    finally:
        sys.stderr = real_stderr
        if log_path:
            stream.close()
