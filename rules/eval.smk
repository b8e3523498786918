# Held-out evaluation: the fp model once per model and eval set, then every checkpoint against it.


rule eval_fp:
    """fp reference: caption log-probs (top-k), layer outputs at sampled positions, the fp table row."""
    input:
        inputs=lambda w: paths.INPUTS.format(model=w.model, calib=w.eval_calib),
        model=model_files,
    output:
        ref=paths.FP_REF,
        table=paths.FP_TABLE,
    log:
        paths.LOGS["eval_fp"],
    benchmark:
        paths.BENCHMARKS["eval_fp"]
    conda:
        "../workflow/envs/vlmquant.yaml"
    resources:
        gpu=W.gpus_per_job(config),
        mem_mb=host_mem("eval"),
    params:
        model=model_cfg,
        settings=W.eval_settings(config),
        ids=lambda w: {"model": w.model, "eval_calib": w.eval_calib},
        device=config["device"],
    script:
        "../scripts/eval_fp.py"


rule eval:
    """Caption NLL/PPL, KL vs fp, per-layer hidden-state and weight errors of one checkpoint."""
    input:
        unpack(eval_inputs),
    output:
        paths.EVAL,
    log:
        paths.LOGS["eval"],
    benchmark:
        paths.BENCHMARKS["eval"]
    conda:
        "../workflow/envs/vlmquant.yaml"
    resources:
        gpu=W.gpus_per_job(config),
        mem_mb=host_mem("eval"),
    params:
        model=model_cfg,
        settings=W.eval_settings(config),
        ids=eval_ids,
        device=config["device"],
    script:
        "../scripts/eval.py"


# Optional (lmms_eval.enabled): benchmarks with an lmms-eval install.
rule lmms_eval:
    input:
        paths.CHECKPOINT,
    output:
        directory(paths.LMMS),
    log:
        paths.LOGS["lmms_eval"],
    conda:
        "../workflow/envs/vlmquant.yaml"
    resources:
        gpu=config["lmms_eval"]["gpus"],
    params:
        cmd=lmms_command,
    shell:
        "rm -rf {output}.tmp && {params.cmd} > {log} 2>&1 && mv {output}.tmp {output}"


rule lmms_eval_fp:
    input:
        model_dir,
    output:
        directory(paths.LMMS_FP),
    log:
        paths.LOGS["lmms_eval_fp"],
    conda:
        "../workflow/envs/vlmquant.yaml"
    resources:
        gpu=config["lmms_eval"]["gpus"],
    params:
        cmd=lmms_command,
    shell:
        "rm -rf {output}.tmp && {params.cmd} > {log} 2>&1 && mv {output}.tmp {output}"
