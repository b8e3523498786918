from vlmquant.workflow.jobserver import forward

forward()  # in the run's job server when it has one

from vlmquant.io.provenance import with_weights
from vlmquant.io.scales import check_cache_weights
from vlmquant.models.loading import open_model
from vlmquant.search.pipeline import run_import
from vlmquant.spec import RunSpec
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    model = open_model(snakemake.params.model, "cpu")
    check_cache_weights(snakemake.input.cache, model.path)  # a vlmquant cache records its weights; others pass
    run_import(model, RunSpec.from_params(snakemake.wildcards.run, snakemake.params.run), snakemake.input.cache,
               snakemake.output[0], with_weights(dict(snakemake.params.names), model.path))
