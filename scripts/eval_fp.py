from vlmquant.workflow.jobserver import forward

forward()  # in the run's job server when it has one

from vlmquant.eval.run import run_fp_reference
from vlmquant.models.loading import open_model
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    run_fp_reference(open_model(snakemake.params.model, snakemake.params.device, snakemake.config["memory"]), snakemake.input.inputs,
                     snakemake.output.ref, snakemake.output.table, dict(snakemake.params.settings),
                     dict(snakemake.params.ids))
