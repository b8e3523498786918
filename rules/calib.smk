rule calib:
    """Sample the calibration set into one Parquet file (images embedded)."""
    input:
        unpack(calib_sources),
    output:
        "results/calib/{calib}.parquet",
    params:
        cfg=calib_cfg,
    log:
        "results/logs/calib/{calib}.log",
    script:
        "../scripts/calib.py"
