from vlmquant.eval.run import run_eval
from vlmquant.models.loading import open_model
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    run_eval(open_model(snakemake.params.model, snakemake.params.device, snakemake.config["memory"]), snakemake.input.checkpoint,
             snakemake.input.inputs, snakemake.input.ref, snakemake.output[0], dict(snakemake.params.settings),
             dict(snakemake.params.ids))
