# Scale cache (none for RTN) + fp model → pseudo-quantized Hugging Face checkpoint folder.


rule export:
    """Fold the run's scales, fake-quantize the language-decoder linears, save an HF folder."""
    input:
        unpack(export_inputs),
    output:
        directory(paths.CHECKPOINT),
    log:
        paths.LOGS["export"],
    benchmark:
        paths.BENCHMARKS["export"]
    conda:
        "../workflow/envs/vlmquant.yaml"
    resources:
        gpu=W.gpus_per_job(config),
        mem_mb=host_mem("export"),
    params:
        model=model_cfg,
        run=export_params,
        max_shard_size=config["export"]["max_shard_size"],
        names=names,
        device=config["device"],
    script:
        "../scripts/export.py"
