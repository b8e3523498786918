from vlmquant.eval.run import run_eval
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    run_eval(dict(snakemake.params.model), snakemake.input.checkpoint, snakemake.input.inputs, snakemake.input.ref,
             snakemake.output[0], dict(snakemake.params.settings), dict(snakemake.params.ids),
             device=snakemake.params.device)
