# Scale cache (none for RTN) + fp model → pseudo-quantized Hugging Face checkpoint folder.


rule export:
    """Fold the run's scales, fake-quantize the language-decoder linears, save an HF folder."""
    input:
        unpack(export_inputs),
    output:
        directory("results/{model}/{calib}/{run}/checkpoint"),
    params:
        model=model_cfg,
        run=export_run,
        ignore=config["export"]["ignore"],
        max_shard_size=config["export"]["max_shard_size"],
        meta=run_names,
        device=config["device"],
    resources:
        gpu=gpus_per_job(config),
        mem_mb=host_mem("export"),
    log:
        "results/logs/{model}/{calib}/{run}/export.log",
    benchmark:
        "results/benchmarks/{model}/{calib}/{run}/export.tsv"
    script:
        "../scripts/export.py"
