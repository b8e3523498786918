from vlmquant.workflow.jobserver import forward

forward()  # in the run's job server when it has one

from vlmquant.export.packed import export_packed
from vlmquant.models.loading import open_model
from vlmquant.spec import RunSpec
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    model = open_model(snakemake.params.model, snakemake.params.device, snakemake.config["memory"])
    export_packed(model, RunSpec.from_params(snakemake.wildcards.run, snakemake.params.run), snakemake.output[0],
                  cache_path=snakemake.input.get("cache"), max_shard_size=snakemake.params.max_shard_size,
                  names=dict(snakemake.params.names))
