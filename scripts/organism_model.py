from vlmquant.workflow.jobserver import forward

forward()  # in the run's job server when it has one

from vlmquant.organism.model import copy_organism
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    copy_organism(snakemake.output[0])
