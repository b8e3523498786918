# Gradients → boundary activations → layer-chunk scale search → merged scale cache.


rule grads:
    """Modality gradient statistics and reweight ratios (only runs with reweight need them)."""
    input:
        inputs=paths.INPUTS,
        model=model_files,
    output:
        paths.GRADS,
    log:
        paths.LOGS["grads"],
    benchmark:
        paths.BENCHMARKS["grads"]
    priority: 2  # heads the longest chains (grads → search → merge → export → eval)
    conda:
        "../workflow/envs/vlmquant.yaml"
    resources:
        gpu=W.gpus_per_job(config),
        mem_mb=host_mem("grads"),
    params:
        sources=model_sources,
        model=model_cfg,
        device=config["device"],
        batch_size=config["search"]["grads_batch_size"],
    script:
        "../scripts/grads.py"


rule acts:
    """fp inputs of the first decoder layer of every search chunk."""
    input:
        inputs=paths.INPUTS,
        model=model_files,
    output:
        directory(paths.ACTS),
    log:
        paths.LOGS["acts"],
    benchmark:
        paths.BENCHMARKS["acts"]
    priority: 2
    conda:
        "../workflow/envs/vlmquant.yaml"
    resources:
        gpu=W.gpus_per_job(config),
        mem_mb=host_mem("acts"),
    params:
        sources=model_sources,
        model=model_cfg,
        device=config["device"],
        starts=chunk_starts,
    script:
        "../scripts/acts.py"


# One job per chunk of `search.layers_per_job` consecutive layers ({chunk}: its first layer). Chunks
# start from the fp layer inputs (acts) and are independent, except in distort runs and GPTQ runs on quantized
# inputs: there a chunk starts from the quantized outputs the previous chunk left in its folder (a chain).
rule search:
    """Scale search (and GPTQ rounding) of one chunk of decoder layers: one scale file per layer."""
    input:
        inputs=paths.INPUTS,
        start=search_start,
        model=model_files,
        grads=grads_input,
    output:
        directory(paths.SCALES),
    log:
        paths.LOGS["search"],
    benchmark:
        paths.BENCHMARKS["search"]
    wildcard_constraints:
        run=W.name_pattern([name for name, spec in RUNS.items() if spec.searches]),
    priority: 1
    conda:
        "../workflow/envs/vlmquant.yaml"
    resources:
        gpu=W.gpus_per_job(config),
        mem_mb=host_mem("search"),
    params:
        sources=model_sources,
        model=model_cfg,
        run=search_params,
        layers=chunk_layers,
        names=names,
        device=config["device"],
    script:
        "../scripts/search.py"


rule merge:
    """All layer files of a run → scale_cache.pt and a table of chosen α and losses."""
    input:
        chunks=chunk_folders,
        model=model_files,
    output:
        cache=paths.SCALE_CACHE,
        table=paths.SEARCH_TABLE,
    log:
        paths.LOGS["merge"],
    wildcard_constraints:
        run=W.name_pattern([name for name, spec in RUNS.items() if spec.searches]),
    conda:
        "../workflow/envs/vlmquant.yaml"
    params:
        sources=model_sources,
        expect=scale_meta,
        model=model_cfg,
    script:
        "../scripts/merge.py"
