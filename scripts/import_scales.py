from vlmquant.models.loading import open_model
from vlmquant.search.pipeline import run_import
from vlmquant.spec import RunSpec
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    run_import(open_model(snakemake.params.model, "cpu"), RunSpec.from_params(snakemake.wildcards.run,
               snakemake.params.run), snakemake.input.cache, snakemake.output[0], dict(snakemake.params.names))
