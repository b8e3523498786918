from vlmquant.workflow.jobserver import forward

forward()  # in the run's job server when it has one

from vlmquant.io.provenance import with_weights
from vlmquant.models.loading import open_model
from vlmquant.search.pipeline import run_search
from vlmquant.spec import RunSpec
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    model = open_model(snakemake.params.model, snakemake.params.device, snakemake.config["memory"])
    run_search(model, RunSpec.from_params(snakemake.wildcards.run, snakemake.params.run), snakemake.input.inputs,
               snakemake.input.start, snakemake.input.grads or None, list(snakemake.params.layers),
               snakemake.output[0], with_weights(dict(snakemake.params.names), model.path))
