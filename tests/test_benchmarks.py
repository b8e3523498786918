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


def test_moe_search_benchmark_runs_and_matches_the_straightforward_expert_loop(tmp_path):
    """Qwen3-VL-MoE-shaped layer, tiny: the batched search picks the α of the loop (every group, every expert)."""
    out = tmp_path / "moe.json"
    subprocess.run([sys.executable, "search_moe.py", "--shape", "demo-moe", "--samples", "2", "--tokens", "96",
                    "--vision", "40", "--caption", "16", "--grid", "4", "--repeats", "1", "--baseline", "--out", str(out)],
                   cwd=REPO / "benchmarks", check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["same_alpha"] and result["differing_experts"] == 0 and result["seconds_per_layer"] > 0
    assert sorted(result["seconds_by_group"]) == ["input_layernorm", "mlp.experts.gate_up_proj (per expert)",
                                                  "post_attention_layernorm", "self_attn.v_proj"]
    assert len(result["alpha"][3]) == 8 and result["tokens_per_expert_min_max"][0] > 0
