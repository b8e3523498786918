from vlmquant.eval.run import run_eval
from vlmquant.models.loading import open_model
from vlmquant.workflow import check_eval_parquets, script_logging

with script_logging(snakemake):
    ids = dict(snakemake.params.ids)
    if snakemake.input.get("search_set"):  # runs with scales: the eval set is held out from their set
        check_eval_parquets(ids["eval_calib"], snakemake.input.eval_set, ids["calib"], snakemake.input.search_set,
                            snakemake.config["eval"]["allow_overlap"])
    run_eval(open_model(snakemake.params.model, snakemake.params.device, snakemake.config["memory"]),
             snakemake.input.checkpoint, snakemake.input.inputs, snakemake.input.ref, snakemake.output[0],
             dict(snakemake.params.settings), ids)
