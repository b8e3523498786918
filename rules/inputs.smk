rule inputs:
    """Apply the model's processor and chat template to every calibration row."""
    input:
        calib=paths.CALIB,
        model=processor_files,
    output:
        paths.INPUTS,
    log:
        paths.LOGS["inputs"],
    conda:
        "../workflow/envs/vlmquant.yaml"
    params:
        sources=processor_sources,
        model=model_cfg,
        labels=calib_labels,
    script:
        "../scripts/inputs.py"
