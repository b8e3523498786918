rule calib:
    """Sample the calibration set into one Parquet file (images embedded)."""
    input:
        unpack(calib_sources),
    output:
        paths.CALIB,
    log:
        paths.LOGS["calib"],
    conda:
        "../workflow/envs/vlmquant.yaml"
    params:
        sources=calib_source_sums,
        cfg=calib_cfg,
    script:
        "../scripts/calib.py"
