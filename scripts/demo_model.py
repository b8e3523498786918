from vlmquant.workflow.jobserver import forward

forward()  # in the run's job server when it has one

from vlmquant.models.tiny import build_demo_model
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    build_demo_model(snakemake.output[0], family=snakemake.wildcards.family, seed=snakemake.params.seed)
