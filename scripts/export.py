from vlmquant.export import export_checkpoint
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    export_checkpoint(dict(snakemake.params.model), dict(snakemake.params.run), snakemake.output[0],
                      cache_path=snakemake.input.get("cache"), ignore=list(snakemake.params.ignore),
                      max_shard_size=snakemake.params.max_shard_size, meta=dict(snakemake.params.meta),
                      device=snakemake.params.device)
