from vlmquant.organism.model import copy_organism
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    copy_organism(snakemake.output[0])
