rule inputs:
    """Apply the model's processor and chat template to every calibration row."""
    input:
        calib="results/calib/{calib}.parquet",
        model=model_dir,
    output:
        "results/{model}/{calib}/inputs.safetensors",
    params:
        model=model_cfg,
    log:
        "results/logs/{model}/{calib}/inputs.log",
    script:
        "../scripts/inputs.py"
