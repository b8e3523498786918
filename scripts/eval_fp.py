from vlmquant.eval.run import run_fp_reference
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    run_fp_reference(dict(snakemake.params.model), snakemake.input.inputs, snakemake.output.ref,
                     snakemake.output.table, dict(snakemake.params.settings), dict(snakemake.params.ids),
                     device=snakemake.params.device)
