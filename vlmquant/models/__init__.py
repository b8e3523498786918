"""Model-family adapters: one module per family in vlmquant/models/families/, named after its Hugging
Face `model_type`. Listing the families reads that folder without importing torch, so the workflow
can check a config quickly; `get_adapter` imports one family's module."""
import importlib
import json
import pkgutil
import re
from pathlib import Path

from vlmquant import paths
from vlmquant.errors import VlmquantError
from vlmquant.models import families as _families


def family_names():
    """Every family with an adapter module, sorted (the `models.<name>.family` values)."""
    return sorted(m.name for m in pkgutil.iter_modules(_families.__path__) if not m.name.startswith("_"))


def get_adapter(family):
    """The adapter of `family` (a model_type); one-line VlmquantError listing the families for another."""
    if family not in family_names():
        raise VlmquantError(f"unknown model family {family!r}; known: {', '.join(family_names())}")
    return importlib.import_module(f"{_families.__name__}.{family}").ADAPTER


def folder_family(path, key="models"):
    """The family of a model folder: its config.json's model_type, or for a demo path not built yet
    (paths.DEMO_MODEL) the family in its name, for the organism's (paths.ORGANISM_MODEL) qwen2_vl. Raises
    VlmquantError naming the folder."""
    config = Path(path) / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise VlmquantError(f"{config}: not valid JSON ({e})") from None
        if model_type not in family_names():
            raise VlmquantError(f"{key}: {path} has model_type {model_type!r}, which no adapter handles; "
                                f"families: {', '.join(family_names())}")
        return model_type
    demo = re.fullmatch(re.escape(paths.DEMO_MODEL).replace(r"\{family\}", "(.+)"), Path(path).as_posix())
    if demo and demo.group(1) in family_names():
        return demo.group(1)
    if Path(path).as_posix() == paths.ORGANISM_MODEL:
        return "qwen2_vl"
    raise VlmquantError(f"{key}: {path} has no config.json (model folder missing?)")


def n_layers(path):
    """Decoder layers of a model folder, from its config.json (the text config's num_hidden_layers)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise VlmquantError(f"models: {path} has no config.json (model folder missing?)")
    cfg = json.loads(config.read_text())
    return cfg.get("text_config", cfg)["num_hidden_layers"]


__all__ = ["family_names", "folder_family", "get_adapter", "n_layers"]
