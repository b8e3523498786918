"""Model inputs: a calibration Parquet run through a model's processor."""
from tqdm import tqdm

from vlmquant.data.calib import read_calib
from vlmquant.io import ragged
from vlmquant.io.provenance import package_versions, sha256_file
from vlmquant.models import get_adapter


def build_inputs(calib_path, model_cfg, out_path, name="model"):
    """Encode every row of `calib_path` with the model's processor; write a packed safetensors file."""
    import transformers

    adapter = get_adapter(model_cfg["family"])
    processor = adapter.load_processor(model_cfg["path"], model_cfg.get("trust_remote_code", False))
    config = transformers.AutoConfig.from_pretrained(model_cfg["path"],
                                                     trust_remote_code=model_cfg.get("trust_remote_code", False))
    rows = read_calib(calib_path)
    samples = [adapter.encode(processor, config, row) for row in tqdm(rows, desc="encode", unit="sample")]
    meta = {"model": name, "family": adapter.family, "path": str(model_cfg["path"]),
            "calib_sha256": sha256_file(calib_path), "sample_ids": [r["sample_id"] for r in rows],
            "packages": package_versions()}
    ragged.save(ragged.pack(samples), out_path, meta)
