from vlmquant.data.calib import build_calib
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    build_calib(dict(snakemake.params.cfg), snakemake.output[0], name=snakemake.wildcards.calib)
