from vlmquant.workflow.jobserver import forward

forward()  # in the run's job server when it has one

from vlmquant.eval.run import RunWeights, run_eval
from vlmquant.models.loading import open_model
from vlmquant.spec import RunSpec
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    inputs = snakemake.input
    # runs with scales: the eval set is held out from their search set
    held_out = (inputs.eval_set, inputs.search_set) if inputs.get("search_set") else None
    weights = RunWeights(RunSpec.from_params(snakemake.wildcards.run, snakemake.params.run), inputs.get("cache"),
                         dict(snakemake.params.names))
    run_eval(open_model(snakemake.params.model, snakemake.params.device, snakemake.config["memory"]), weights,
             inputs.inputs, inputs.ref, snakemake.output[0], dict(snakemake.params.settings),
             dict(snakemake.params.ids), held_out, snakemake.config["eval"]["allow_overlap"])
