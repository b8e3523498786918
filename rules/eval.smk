# Held-out evaluation: the fp model once per model and eval set, then every run's weights against it.


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
        sources=model_sources,
        model=model_cfg,
        settings=W.eval_settings(config),
        ids=lambda w: {"model": w.model, "eval_calib": w.eval_calib},
        device=config["device"],
    script:
        "../scripts/eval_fp.py"


rule eval:
    """Caption NLL/PPL, KL vs fp, per-layer hidden-state and weight errors of one run's weights, made in memory
    from the model and the scale cache as export writes them."""
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
        sources=model_sources,
        model=model_cfg,
        settings=W.eval_settings(config),
        ids=eval_ids,
        run=export_params,
        names=names,
        device=config["device"],
    script:
        "../scripts/eval.py"


# Optional (lmms_eval.enabled): lmms-eval benchmarks of every checkpoint and the fp model; their scores
# join the summary.
rule lmms_eval:
    """lmms-eval (`lmms_eval.tasks`) on one checkpoint; fails when lmms-eval writes no results file."""
    input:
        unpack(lmms_inputs),
    output:
        directory(paths.LMMS),
    log:
        paths.LOGS["lmms_eval"],
    conda:
        "../workflow/envs/lmms.yaml"
    resources:
        gpu=W.lmms_gpus(config),
    params:
        cmd=lmms_command,
        offline=config["lmms_eval"]["offline"],
    script:
        "../scripts/lmms_eval.py"


rule lmms_eval_fp:
    """lmms-eval on the fp model."""
    input:
        unpack(lmms_fp_inputs),
    output:
        directory(paths.LMMS_FP),
    log:
        paths.LOGS["lmms_eval_fp"],
    conda:
        "../workflow/envs/lmms.yaml"
    resources:
        gpu=W.lmms_gpus(config),
    params:
        sources=model_sources,
        cmd=lmms_command,
        offline=config["lmms_eval"]["offline"],
    script:
        "../scripts/lmms_eval.py"
