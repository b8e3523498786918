# Gradients → boundary activations → layer-chunk scale search → merged scale cache.


rule grads:
    """Modality gradient statistics and reweight ratios (only runs with reweight need them)."""
    input:
        inputs="results/{model}/{calib}/inputs.safetensors",
        model=model_dir,
    output:
        "results/{model}/{calib}/grads.safetensors",
    params:
        model=model_cfg,
        device=config["device"],
        batch_size=config["search"]["grads_batch_size"],
    resources:
        gpu=gpus_per_job(config),
        mem_mb=host_mem("grads"),
    log:
        "results/logs/{model}/{calib}/grads.log",
    benchmark:
        "results/benchmarks/{model}/{calib}/grads.tsv"
    priority: 2  # heads the longest chains (grads → search → merge → export → eval)
    script:
        "../scripts/grads.py"


rule acts:
    """fp inputs of the first decoder layer of every search chunk."""
    input:
        inputs="results/{model}/{calib}/inputs.safetensors",
        model=model_dir,
    output:
        directory("results/{model}/{calib}/acts"),
    params:
        model=model_cfg,
        device=config["device"],
        starts=chunk_starts,
    resources:
        gpu=gpus_per_job(config),
        mem_mb=host_mem("acts"),
    log:
        "results/logs/{model}/{calib}/acts.log",
    benchmark:
        "results/benchmarks/{model}/{calib}/acts.tsv"
    priority: 2
    script:
        "../scripts/acts.py"


# One job per chunk of `search.layers_per_job` consecutive layers. Chunks start from the fp layer
# inputs (acts) and are independent, except for `distort` runs: there chunk k starts from the
# quantized outputs chunk k-1 left, so a run's chunks form a chain.
for _model, _first, _end in search_chunks(config):
    for _distort in distort_modes(config):
        _hands_on = _distort and _end < n_layers(config["models"][_model])

        rule:
            name:
                f"search_{rule_name(_model)}_{_first:03d}" + ("_distort" if _distort else "")
            input:
                inputs=f"results/{_model}/{{calib}}/inputs.safetensors",
                start=boundary_file(_model, _first) if _distort and _first else f"results/{_model}/{{calib}}/acts",
                model=config["models"][_model]["path"],
                grads=grads_input(_model),
            output:
                layers=[layer_file(_model, i) for i in range(_first, _end)],
                **({"boundary": boundary_file(_model, _end)} if _hands_on else {}),
            wildcard_constraints:
                run=runs_with(config, _distort),
            params:
                model=config["models"][_model],
                run=run_cfg,
                layers=list(range(_first, _end)),
                meta=scale_meta(_model),
                device=config["device"],
                # distort: the linears the checkpoint leaves fp stay fp in the forward to the next layer
                **({"ignore": config["export"]["ignore"]} if _distort else {}),
            resources:
                gpu=gpus_per_job(config),
                mem_mb=host_mem("search", _model),
            log:
                f"results/logs/{_model}/{{calib}}/{{run}}/search_{_first:03d}.log",
            benchmark:
                f"results/benchmarks/{_model}/{{calib}}/{{run}}/search_{_first:03d}.tsv"
            priority: 1
            script:
                "../scripts/search.py"


rule merge:
    """All layer files of a run → scale_cache.pt and a table of chosen α and losses."""
    input:
        layer_files,
    output:
        cache="results/{model}/{calib}/{run}/scale_cache.pt",
        table="results/{model}/{calib}/{run}/search.parquet",
    params:
        expect=merge_meta,
    log:
        "results/logs/{model}/{calib}/{run}/merge.log",
    script:
        "../scripts/merge.py"
