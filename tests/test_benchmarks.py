"""The benchmark script runs (tiny config) and its JAX and PyTorch sides agree; no timing asserted."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_caption_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_blip_caption.py"), "--small", "--iters", "1",
                    "--warmup", "1", "--out", str(out)], check=True, capture_output=True, text=True, timeout=600)
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"greedy", "beam3", "train"}
    assert results["greedy"]["all_identical"] and results["beam3"]["all_identical"]
    assert results["train"]["loss_abs_diff"] < 1e-4
    assert all(r["ratio"] > 0 for r in results.values())


def test_blip2_opt_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_blip2_opt.py"), "--small", "--iters", "1",
                    "--warmup", "1", "--out", str(out)], check=True, capture_output=True, text=True, timeout=600)
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"greedy", "beam5"}
    assert results["greedy"]["all_identical"] and results["beam5"]["all_identical"]
    assert all(r["ratio"] > 0 for r in results.values())


def test_blip2_train_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_blip2_train.py"), "--small", "--iters", "1",
                    "--warmup", "1", "--out", str(out)], check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {"unrolled", "scan"}
    assert report["loss_agrees"]
    assert all(r["first_loss_rel_diff"] < 1e-4 for r in results.values())
    assert all(r["ratio"] > 0 for r in results.values())
    assert report["headline_layout"] in results and report["ratio"] > 0


def test_data_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_data.py"), "--small", "--iters", "1",
                    "--workers", "0", "--out", str(out)], check=True, capture_output=True, text=True, timeout=120)
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"blip_train_384", "blip2_train_224"}
    for per_workers in report["results"].values():
        r = per_workers["workers_0"]
        assert {"grain", "grain_rt2", "torch"} <= set(r)
        assert all(r[v]["images_per_s"] > 0 and r[v]["first_batch_s"] > 0 for v in ("grain", "grain_rt2", "torch"))
        assert r["ratio"] > 0
    assert set(report["ratios"]) == {"blip_train_384/workers_0", "blip2_train_224/workers_0"}
    assert all(t["decode_plus_transform_images_per_s"] > 0 for t in report["single_core"]["transforms"].values())
    assert report["fixture"]["images"] == 32 and report["fixture"]["jpeg_kb_mean"] > 0
    assert "per_core_rates" in report["training_step_context"]


def test_retrieval_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_retrieval.py"), "--small", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text())
    phases = {"images", "texts", "sim_topk", "itm_i2t", "itm_t2i"}
    assert set(report["phases_s"]) == {"jax", "torch"}
    assert all(set(report["phases_s"][side]) == phases for side in ("jax", "torch"))
    assert report["agreement"]["agrees"] and report["agreement"]["recall_equal"]
    assert report["agreement"]["max_score_abs_diff"] < 1e-3
    assert report["metrics"]["jax"] == report["metrics"]["torch"]
    n_itm = report["images"] * report["k_txt"] + report["texts"] * report["k_img"]
    assert report["itm_passes"] == n_itm
    assert report["itm_passes_measured"]["jax_pairs"] == report["itm_passes_measured"]["torch_pairs"] == n_itm
    assert report["jax_compilations_in_timed_runs"] == 0
    assert report["ratio"] > 0 and report["jax_s"] > 0 and report["torch_s"] > 0


def test_convert_memory_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_convert_memory.py"), "--vision-layers", "2",
                    "--text-layers", "1", "--out", str(out)], check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    assert report["vision_layers"] == 2 and report["file_gb"] > 0.1
    assert report["peak_rss_mb"] > report["baseline_rss_mb"] > 0 and report["peak_anon_mb"] > 0
