"""The benchmark's CI smoke mode: every part reports, and apo_jax and TRL's DPOTrainer agree on the
same weights and batch (step-0 log-probs, the loss after one update). Timings are not asserted."""

from __future__ import annotations

import json
import math


def test_flops_formula_matches_a_hand_count():
    from experiments import bench

    config = bench.shape_config("tiny", "float32", "none")  # D 64, F 128, V 384, L 2, N 4, K 2, H 16
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128  # q, k, v, o, gate/up/down
    matmul = 2 * per_layer + 64 * 384  # two layers and the LM head
    assert bench.flops_per_token(config, 64) == 2 * matmul + 2 * 2 * 4 * 16 * 64
    assert 7.9e9 < sum(bench.param_counts(bench.shape_config("8b", "bfloat16", "full")).values()) < 8.1e9


def test_smoke_run_is_complete_and_agrees_with_trl(tmp_path):
    from experiments import bench

    out = tmp_path / "bench.json"
    rc = bench.main(["--smoke", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["agreement_problems"] == [] and rc == 0
    results = report["results"]
    assert {r["part"] for r in results} == {"step", "logprobs", "data", "sampling"}
    steps = {(r["impl"], r["reference"], r["layout"]) for r in results if r["part"] == "step"}
    assert steps == {
        ("apo_jax", "frozen", "padded"),
        ("apo_jax", "precomputed", "padded"),
        ("apo_jax", "precomputed", "packed"),
        ("apo_jax", "precomputed", "prompt_shared"),
        ("trl", "frozen", "padded (to the longest)"),  # the smoke run skips TRL's precomputed mode
    }
    for r in results:
        assert "error" not in r and "skipped" not in r, r
        if "tokens_per_s" in r:
            assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
    # APO-zero at policy = reference is 1.0 for both; the first update lowers it by the same amount
    trl = [r for r in results if r["part"] == "step" and r["impl"] == "trl"]
    assert all(abs(r["step0_loss"] - 1.0) < 1e-6 and r["step1_loss"] < 0.999 for r in trl)
    assert all(r["memory_ratio"] > 1 for r in results if r["part"] == "logprobs")
    assert len(report["ratios"]) >= 5 and report["machine"]["commit"]
    sampled = {(r["impl"], r["batch"]) for r in results if r["part"] == "sampling"}
    assert sampled == {("apo_jax", 4), ("transformers", 4)}  # the same weights and prompts


def test_compare_flags_a_device_whose_step_numbers_differ(tmp_path):
    """experiments.gpu.compare (GPU vs CPU smoke runs): equal within rtol passes, a changed loss fails."""
    from experiments.gpu import compare

    row = {
        "part": "step",
        "impl": "apo_jax",
        "reference": "frozen",
        "layout": "padded",
        "step0_loss": 1.0,
        "step0_logps_chosen": -231.6,
        "step0_logps_rejected": -185.8,
        "step1_loss": 0.765,
    }
    files = {}
    for name, step1 in (("cpu", 0.765), ("gpu_close", 0.765 * (1 + 2e-4)), ("gpu_off", 0.70)):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps({"results": [dict(row, step1_loss=step1), {"part": "logprobs"}]}))
    assert compare.main([str(files["gpu_close"]), str(files["cpu"])]) == 0
    assert compare.main([str(files["gpu_off"]), str(files["cpu"])]) == 1
