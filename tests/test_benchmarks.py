"""The search benchmark runs on the CPU at a tiny shape, and its fast path agrees with the plain loop."""
import json
import subprocess
import sys

from conftest import REPO


def test_search_layer_benchmark_runs_and_matches_the_straightforward_loop(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "search_layer.py", "--shape", "demo", "--samples", "2", "--tokens", "128", "--vision", "48", "--caption", "16",
                    "--grid", "4", "--repeats", "1", "--baseline", "--out", str(out)],
                   cwd=REPO / "benchmarks", check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["alpha"] == result["baseline_alpha"] and result["seconds_per_layer"] > 0
    assert result["loss_token_share"] == 0.5 and result["tflop"] < result["tflop_all_tokens"]
