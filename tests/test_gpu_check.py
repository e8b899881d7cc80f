"""The GPU check keeps working where there is no GPU: its dry run end to end on the CPU, its
per-step time guard, and its one-line refusal without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import gpu_check
from reliability import ENV, ROOT

STEP_NAMES = [name for name, _ in gpu_check.STEPS]


def run_check(*args: object, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def assert_sane_dry_run(report: dict, skipped: set[str]) -> None:
    import diffusers

    assert report["dry_run"] is True and report["device"] == "cpu"
    steps = report["steps"]
    assert list(steps) == STEP_NAMES
    for name, rec in steps.items():
        assert rec["status"] == ("skipped" if name in skipped else "passed"), (name, rec.get("error"), rec.get("traceback"))
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["diffusers"] == diffusers.__version__
    assert env["gpu"] is None and env["peak_tflops"] is None and env["matmul_tflops_measured"] > 0
    assert report["elapsed_s"] > 0 and report["finished_at"]

    g = steps["generate"]
    total = len(gpu_check.PROMPTS) * gpu_check.DRY.per_prompt
    assert gpu_check.DRY.kill_after <= g["killed_after_rows"] < total
    assert g["rerun"] == {"skipped_existing": g["killed_after_rows"], "generated": total - g["killed_after_rows"]}
    assert len(g["images"]) == total and g["dtype"] == ["float32"]
    assert all(im["size"] == [64, 64] and im["max"] > 2 for im in g["images"])

    r = steps["regenerate"]
    assert r["batch1_row"]["max_level_difference"] == 0 and r["batched_row"]["max_level_difference"] <= 1

    t = steps["throughput_baseline"]
    assert set(t["variants"]) == {"plain call, one generator", "plain call, per-image CPU generators",
                                  "memaudit sample", "memaudit generate (storing, no load)"}
    assert all(v["images_per_s"] > 0 and v["ratio_to_plain"] > 0 for v in t["variants"].values())

    u = steps["unet_sweep"]
    assert u["unet_gflop_per_forward"] > 0 and u["unet_parameters"] > 0
    kinds = {(c["dtype"], c["attention"], c["channels_last"]) for c in u["configs"]}
    assert {("float16", "sdpa", False), ("float16", "math", False), ("bfloat16", "sdpa", False)} <= kinds
    assert [c["batch"] for c in u["configs"][4:]] == list(gpu_check.DRY.sweep_batches)
    assert u["best"]["batch"] in gpu_check.DRY.sweep_batches and u["best"]["fraction_of_peak"] is None

    a = steps["audit"]
    assert a["cpu"]["device"] == a["auto"]["device"] == "cpu"
    assert max(a["max_distance_difference"].values()) <= 1e-6 and a["max_neighbour_l2_difference"] <= 1e-6
    assert a["verdicts"]["cpu"] == a["verdicts"]["gpu"] and a["verdicts"]["gpu"][0][1]  # the planted clique is flagged
    assert a["cpu"]["prompts_per_minute"] > 0 and a["ratio_cpu_to_gpu"] > 0

    b = steps["throughput_best"]
    assert b["images_per_s"] > 0 and b["it_per_s"] > 0 and b["fraction_of_peak"] is None
    assert b["compiled"] == ("unet_compile" not in skipped and steps["unet_compile"]["used_for_best"])


def test_dry_run_goes_end_to_end_on_the_cpu(tmp_path):
    """The one end-to-end proof of the GPU check: every step on the CPU at tiny sizes (torch.compile and the
    nested pytest run left out here; the slow test below runs them)."""
    out = tmp_path / "check.json"
    start = time.perf_counter()
    done = run_check("--dry-run", "--out", out, "--skip", "gpu_tests", "unet_compile")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert_sane_dry_run(report, {"gpu_tests", "unet_compile"})
    assert report["elapsed_s"] <= time.perf_counter() - start
    # one table at the end, one row per step
    table = done.stdout[done.stdout.index("GPU check (dry run"):]
    assert all(f"\n{name} " in table for name in STEP_NAMES)


@pytest.mark.slow
def test_dry_run_with_every_step(tmp_path):
    out = tmp_path / "check.json"
    done = run_check("--dry-run", "--out", out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert_sane_dry_run(report, set())
    tests = report["steps"]["gpu_tests"]
    assert tests["files"] == [p.name for p in gpu_check.gpu_test_files()] and len(tests["files"]) >= 3
    assert tests["skipped"] >= 4 and tests["failed"] == 0  # no CUDA here: every gpu test skips
    assert report["steps"]["unet_compile"]["compile_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path):
    out = tmp_path / "check.json"
    done = run_check("--out", out, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "no CUDA GPU is usable here" in done.stderr and "--dry-run" in done.stderr
    assert not out.exists()


def test_a_step_over_its_budget_is_stopped_and_the_next_one_runs(tmp_path, capsys):
    sizes = gpu_check.Sizes(**{**gpu_check.DRY.__dict__, "budgets": {"slow": 1, "after": 5}})
    check = gpu_check.Check(sizes, "cpu", tmp_path / "check.json", dry_run=True)

    def slow(check, rec):
        rec["first_half"] = 1.0
        time.sleep(30)
        rec["never"] = True

    def after(check, rec):
        rec["checks"]["ran"] = True

    start = time.perf_counter()
    check.run("slow", slow)
    assert time.perf_counter() - start < 10
    report = json.loads((tmp_path / "check.json").read_text())  # written after every step
    assert report["steps"]["slow"]["status"] == "timeout" and report["steps"]["slow"]["first_half"] == 1.0
    assert "never" not in report["steps"]["slow"]
    check.run("after", after)
    assert check.finish() == 1  # a timed-out step fails the check
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["steps"]["after"]["status"] == "passed"
    assert "slow: timeout" in capsys.readouterr().out


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
    ("NVIDIA GeForce RTX 4090", None), (None, None),
])
def test_peak_flops_by_gpu_name(name, peak):
    assert gpu_check.peak_tflops(name) == peak
