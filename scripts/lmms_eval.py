import sys

from vlmquant.eval.lmms_results import run_lmms_eval
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    run_lmms_eval(list(snakemake.params.cmd), snakemake.output[0], snakemake.params.offline, log=sys.stderr)
