"""Offline demo: calibration data from photos shipped in pip packages (dataset.py) and tiny
random-init VLMs of real architectures (model.py)."""
