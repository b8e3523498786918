from pathlib import Path

from vlmquant.search.pipeline import run_search
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    first = snakemake.params.layers[0]
    run_search(dict(snakemake.params.model), dict(snakemake.params.run), snakemake.input.inputs,
               Path(snakemake.input.acts) / f"layer_{first:03d}.safetensors",
               snakemake.input.grads or None, list(snakemake.params.layers), list(snakemake.output),
               dict(snakemake.params.meta), device=snakemake.params.device)
