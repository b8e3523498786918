# Held-out evaluation: the fp model once per model and eval set, then every checkpoint against it.


rule eval_fp:
    """fp reference: caption log-probs (top-k), layer outputs at sampled positions, the fp table row."""
    input:
        inputs="results/{model}/{eval_calib}/inputs.safetensors",
        model=model_dir,
    output:
        ref="results/{model}/eval-{eval_calib}/fp.safetensors",
        table="results/{model}/eval-{eval_calib}/fp.parquet",
    params:
        model=model_cfg,
        settings=layout.eval_settings(config),
        ids=lambda w: {"model": w.model, "eval_calib": w.eval_calib},
        device=config["device"],
    resources:
        gpu=gpus_per_job(config),
        mem_mb=host_mem("eval"),
    log:
        "results/logs/{model}/eval-{eval_calib}/fp.log",
    benchmark:
        "results/benchmarks/{model}/eval-{eval_calib}/fp.tsv"
    script:
        "../scripts/eval_fp.py"


rule eval:
    """Caption NLL/PPL, KL vs fp, per-layer hidden-state and weight errors of one checkpoint."""
    input:
        unpack(eval_inputs),
    output:
        "results/{model}/{calib}/{run}/eval.parquet",
    params:
        model=model_cfg,
        settings=layout.eval_settings(config),
        ids=run_ids,
        device=config["device"],
    resources:
        gpu=gpus_per_job(config),
        mem_mb=host_mem("eval"),
    log:
        "results/logs/{model}/{calib}/{run}/eval.log",
    benchmark:
        "results/benchmarks/{model}/{calib}/{run}/eval.tsv"
    script:
        "../scripts/eval.py"


# Optional (lmms_eval.enabled): benchmarks with an lmms-eval install; never run in CI.
rule lmms_eval:
    input:
        "results/{model}/{calib}/{run}/checkpoint",
    output:
        directory("results/{model}/{calib}/{run}/lmms_eval"),
    params:
        cmd=lmms_command,
    resources:
        gpu=config["lmms_eval"]["gpus"],
    log:
        "results/logs/{model}/{calib}/{run}/lmms_eval.log",
    shell:
        "rm -rf {output}.tmp && {params.cmd} > {log} 2>&1 && mv {output}.tmp {output}"


rule lmms_eval_fp:
    input:
        model_dir,
    output:
        directory("results/{model}/fp/lmms_eval"),
    params:
        cmd=lmms_command,
    resources:
        gpu=config["lmms_eval"]["gpus"],
    log:
        "results/logs/{model}/fp/lmms_eval.log",
    shell:
        "rm -rf {output}.tmp && {params.cmd} > {log} 2>&1 && mv {output}.tmp {output}"
