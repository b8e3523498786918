from vlmquant.data.workers import encode_workers  # light: no torch at workflow load


rule inputs:
    """Apply the model's processor and chat template to every calibration row, on up to `threads` processes."""
    input:
        calib=paths.CALIB,
        model=processor_files,
    output:
        paths.INPUTS,
    log:
        paths.LOGS["inputs"],
    conda:
        "../workflow/envs/vlmquant.yaml"
    threads: lambda w: encode_workers(config["calib"][w.calib]["n_samples"])
    resources:
        cpus_per_task=lambda w, threads: threads,  # SLURM: the job's threads, not the profile's default
    params:
        sources=processor_sources,
        model=model_cfg,
        labels=calib_labels,
    script:
        "../scripts/inputs.py"
