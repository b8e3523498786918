"""The inputs stage on several processes: the same bytes as on one, the same one-line error, nothing written."""
import io
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vlmquant.data import workers
from vlmquant.data.calib import SCHEMA, build_calib, read_calib
from vlmquant.data.inputs import build_inputs, encode_rows
from vlmquant.data.workers import encode_workers
from vlmquant.errors import VlmquantError

from conftest import open_demo
from test_calib import coco_cfg


def test_workers_follow_the_rows_and_the_cores():
    assert [encode_workers(n, cores) for n, cores in [(8, 2), (6, 2), (16, 2), (40, 16), (128, 16), (3, 4)]] == \
        [1, 1, 2, 5, 16, 1]
    assert encode_workers(1000) == 125 and encode_workers(0) == 1


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_several_workers_write_the_bytes_of_one(family, family_demo, demo_data, tmp_path, monkeypatch):
    """Two images a row (few-shot; LLaVA-OneVision: a different number of tiles per image), 5 rows on 3
    processes one row at a time: the file, its metadata and its order are those of one process."""
    _, model = family_demo(family)
    calib = tmp_path / "c.parquet"
    build_calib(coco_cfg(demo_data, format="few_shot", n_samples=5), calib)
    build_inputs(calib, model, tmp_path / "one.safetensors", workers=1)
    monkeypatch.setattr(workers, "ROWS_PER_WORKER", 1)
    assert encode_workers(5, 3) == 3
    build_inputs(calib, model, tmp_path / "three.safetensors", workers=3)
    assert (tmp_path / "three.safetensors").read_bytes() == (tmp_path / "one.safetensors").read_bytes()


def test_rows_are_encoded_in_other_processes_and_come_back_in_order(demo_model_path, demo_data, tmp_path, monkeypatch):
    model = open_demo(demo_model_path)
    build_calib(coco_cfg(demo_data, n_samples=6), tmp_path / "c.parquet")
    rows, processor, config = read_calib(tmp_path / "c.parquet"), model.processor(), model.config()
    alone = encode_rows(model.adapter, processor, config, rows, "c.parquet")
    encode = model.adapter.encode
    monkeypatch.setattr(model.adapter, "encode", lambda *a: {**encode(*a), "pid": torch.tensor([os.getpid()])})
    apart = encode_rows(model.adapter, processor, config, rows, "c.parquet", workers=2)
    pids = {int(s.pop("pid")) for s in apart}
    assert len(pids) == 2 and os.getpid() not in pids
    assert len(apart) == len(alone) == 6
    for a, b in zip(apart, alone):
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def strip_row(name):
    """A row the processor refuses (aspect ratio 205 > 200), as test_screens writes by hand."""
    buf = io.BytesIO()
    Image.new("RGB", (4100, 20)).save(buf, "PNG")
    return {"sample_id": name, "image_ids": ["9"], "file_names": [f"{name}.png"], "images": [buf.getvalue()],
            "image_sha256": ["0"], "turns": [{"role": "user", "text": "Describe.", "images": [0]},
                                             {"role": "assistant", "text": "A strip.", "images": []}]}


def test_a_failing_row_in_a_worker_gives_the_first_ones_line_and_no_file(demo_model_path, demo_data, tmp_path,
                                                                          monkeypatch):
    """Rows 1 and 3 of 6 fail: on 2 processes, one row at a time, the error is row 1's line, as on one process;
    the worker's traceback reaches the log; no inputs file."""
    build_calib(coco_cfg(demo_data, n_samples=4), tmp_path / "good.parquet")
    rows = read_calib(tmp_path / "good.parquet")
    rows[1:1], rows[3:3] = [strip_row("s9a")], [strip_row("s9b")]
    calib = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), calib)
    expected = (f"{calib}: sample s9a (s9a.png) could not be encoded for qwen2_vl (ValueError: absolute aspect ratio "
                f"must be smaller than 200, got 205.0); traceback in the log")
    out = tmp_path / "inputs.safetensors"
    with pytest.raises(VlmquantError) as one:
        build_inputs(calib, open_demo(demo_model_path), out, workers=1)
    assert str(one.value) == expected

    log_file = tmp_path / "job.log"
    handler = logging.FileHandler(log_file)
    logging.getLogger("vlmquant.data.inputs").addHandler(handler)
    monkeypatch.setattr(workers, "ROWS_PER_WORKER", 1)
    try:
        with pytest.raises(VlmquantError) as two:
            build_inputs(calib, open_demo(demo_model_path), out, workers=2)
    finally:
        logging.getLogger("vlmquant.data.inputs").removeHandler(handler)
        handler.close()
    assert str(two.value) == expected
    log = log_file.read_text()
    assert "encoding sample s9a failed" in log and "Traceback" in log and "must be smaller than 200" in log
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["c.parquet", "good.parquet", "job.log"]
