from vlmquant.search.pipeline import run_search
from vlmquant.workflow import chunk_start, script_logging

with script_logging(snakemake):
    layers = list(snakemake.params.layers)
    run_search(dict(snakemake.params.model), dict(snakemake.params.run), snakemake.input.inputs,
               chunk_start(snakemake.input.start, layers[0]), snakemake.input.grads or None, layers,
               list(snakemake.output.layers), dict(snakemake.params.meta), device=snakemake.params.device,
               boundary_path=snakemake.output.get("boundary"), ignore=list(snakemake.params.get("ignore", [])))
