# Scale cache (none for RTN) + fp model → pseudo-quantized and compressed-tensors checkpoint folders;
# a run with `scale_cache` imports its cache instead of searching.


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
        sources=model_sources,
        model=model_cfg,
        run=export_params,
        max_shard_size=config["export"]["max_shard_size"],
        names=names,
        device=config["device"],
    script:
        "../scripts/export.py"


rule pack:
    """The same codes and scales as the pseudo checkpoint, packed with compressed-tensors (for serving)."""
    input:
        unpack(export_inputs),
    output:
        directory(paths.PACKED),
    log:
        paths.LOGS["pack"],
    benchmark:
        paths.BENCHMARKS["pack"]
    conda:
        "../workflow/envs/vlmquant.yaml"
    resources:
        gpu=W.gpus_per_job(config),
        mem_mb=host_mem("export"),
    params:
        sources=model_sources,
        model=model_cfg,
        run=export_params,
        max_shard_size=config["export"]["max_shard_size"],
        names=names,
        device=config["device"],
    script:
        "../scripts/pack.py"


rule import_scales:
    """A scale cache made elsewhere (runs.<name>.scale_cache), checked against the model, as the run's cache."""
    input:
        cache=imported_cache,
        model=model_files,
    output:
        paths.SCALE_CACHE,
    log:
        paths.LOGS["import_scales"],
    wildcard_constraints:
        run=W.name_pattern([name for name, spec in RUNS.items() if spec.scale_cache]),
    conda:
        "../workflow/envs/vlmquant.yaml"
    params:
        sources=import_sources,
        model=model_cfg,
        run=search_params,
        names=names,
    script:
        "../scripts/import_scales.py"
