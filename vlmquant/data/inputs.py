"""Model inputs: a calibration Parquet run through a model's processor."""
from tqdm import tqdm

from vlmquant.data.calib import read_calib
from vlmquant.io import ragged
from vlmquant.io.provenance import package_versions, sha256_file


def build_inputs(calib_path, model, out_path, name="model"):
    """Encode every row of `calib_path` with the processor of `model` (ModelRef); write a packed safetensors file."""
    adapter, processor, config = model.adapter, model.processor(), model.config()
    rows = read_calib(calib_path)
    samples = [adapter.encode(processor, config, row) for row in tqdm(rows, desc="encode", unit="sample")]
    meta = {"model": name, "family": adapter.family, "path": str(model.path),
            "calib_sha256": sha256_file(calib_path), "sample_ids": [r["sample_id"] for r in rows],
            "packages": package_versions()}
    ragged.save(ragged.pack(samples), out_path, meta)
