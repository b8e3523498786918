"""The summary table across models, calibration sets and runs, and the report plots."""
