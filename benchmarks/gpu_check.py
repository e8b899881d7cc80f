"""GPU readiness: one command that verifies and measures every GPU path of memaudit.

    python -m benchmarks.gpu_check [--out FILE] [--dry-run] [--skip STEP ...]     (or: make gpu-check)

On a machine with a CUDA GPU it runs, in order, each step under its own time budget
(``FULL.budgets``; no step starts after 455 s, so the whole run, model building included,
fits in 8 minutes):

correctness
  environment       GPU name, driver, memory, torch / CUDA / diffusers versions, the GPU's
                    published peak (``PEAK_TFLOPS``) and a measured bf16 matrix-product rate
  build_model       a text-to-image pipeline with Stable Diffusion 1.5's architecture and random
                    weights (tests/tiny_models.py ``build_sd15``: UNet 860M, VAE 84M, CLIP text
                    encoder 123M parameters), saved in fp16 to a folder as a user's model is
  generate          ``memaudit generate`` on that folder (a real CLI process: fp16 on CUDA,
                    512 x 512, 50 steps, batch 2) killed with SIGKILL after a few rows: the
                    workspace is consistent (tests/reliability.py ``assert_consistent``, which runs
                    ``memaudit verify``); the rerun finishes with exact counts; every image is
                    finite (memaudit refuses NaN), not black, fp16, 512 x 512
  regenerate        a batched row regenerated alone is within one 8-bit level of its stored
                    pixels (the documented bound), a batch-1 row exactly equal
  gpu_tests         ``pytest -m gpu`` (started in the background after "environment"): CUDA
                    distances against the CPU's within 1e-4 and exactly 0 for identical images,
                    the audit on CUDA, fp16 generation and regeneration on CUDA
throughput (512 x 512, 50 steps, guidance 7.5)
  throughput_baseline  images/s at batch 16 in memaudit's fp16, interleaved rounds: a plain
                    diffusers call (one generator), the same with per-image CPU generators,
                    ``core.generate.sample`` and ``core.generate.generate`` (storing included,
                    loading excluded); ratios to the plain call
  unet_sweep        UNet FLOPs per forward (``torch.utils.flop_counter``), then one UNet forward
                    timed per configuration: fp16 / bf16, SDPA / the math kernel, channels-last,
                    and a batch size sweep; achieved TFLOP/s and fraction of peak
  audit             one prompt of 500 generations at 512 x 512 through ``core.audit.run_audit``
                    with ``audit_device`` cuda, then cpu: seconds, the ratio, prompts per minute,
                    the two runs' distances and verdicts compared
  unet_compile      ``torch.compile`` of the UNet at the best batch: compile seconds, speed-up
  throughput_best   ``core.generate.sample`` with the best configuration found (dtype, memory
                    format, compiled UNet when it paid, batch): images/s, it/s and the fraction
                    of the GPU's peak that the UNet's FLOPs imply

Every step records what it measured as it goes; a step that overruns its budget is stopped
(SIGALRM; its subprocesses are killed), reported as "timeout" with what it had, and the next
one starts. The JSON report (``--out``, default benchmarks/out/gpu_check.json) is rewritten
after every step, so a run killed from outside still leaves the steps it finished. One table
is printed at the end. Exit status: 0 when every step passed (or was left out with
``--skip``), 1 otherwise, 2 when there is no CUDA GPU and no ``--dry-run``.

``--dry-run`` runs the same steps on the CPU at tiny sizes (``DRY``: the SD 1.5 blocks at
64 x 64 with small widths, 4 steps, an audit of 40 generations of 64 x 64, torch.compile with
the eager backend) so that the tests keep the script working; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import OUT, ROOT, cpu_model, fmt

TESTS = ROOT / "tests"
PROMPTS = ("a photograph of an astronaut riding a horse", "a red fox sitting in the snow")
ALONE_PROMPT = "an oil painting of a lighthouse at night"
GUIDANCE = 7.5

# Dense fp16/bf16 tensor-core peak in TFLOP/s (no sparsity), from the vendor's data sheets, by a
# substring of torch.cuda.get_device_name(); the first match wins, so longer names come first.
PEAK_TFLOPS = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("V100", 125.0), ("T4", 65.0),
)
# Published figures for Stable Diffusion 1.5 on one A100 (diffusers' own benchmarks), for comparison.
ANCHORS_A100 = {"plain_it_per_s_batch1": 31.0, "compiled_it_per_s_batch1": 47.0, "images_per_s_batch64_50_steps": 1.2}


@dataclass(frozen=True)
class Sizes:
    tiny: bool  # the SD 1.5 blocks at 64 x 64 with small widths (tests/tiny_models.py SD15_TINY)
    correctness_steps: int  # steps of the generate / regenerate runs
    per_prompt: int  # images per prompt of the generate run (2 prompts)
    batch_correctness: int  # its batch size
    kill_after: int  # rows it stores before it is killed
    steps: int  # throughput: sampling steps
    batch: int  # throughput baseline batch size
    rounds: int  # interleaved timed rounds of the baseline
    sweep_batches: tuple[int, ...]  # images per call (the UNet sees twice as many with guidance)
    unet_iters: int  # timed UNet forwards per configuration
    compile_backend: str  # torch.compile backend
    audit_generations: int
    audit_size: int
    total_s: float  # no step starts after this many seconds
    budgets: dict[str, float] = field(default_factory=dict)


FULL = Sizes(
    tiny=False, correctness_steps=50, per_prompt=6, batch_correctness=2, kill_after=4,
    steps=50, batch=16, rounds=2, sweep_batches=(1, 4, 8, 16, 32, 64), unet_iters=5, compile_backend="inductor",
    audit_generations=500, audit_size=512, total_s=455.0,
    budgets={"environment": 10, "build_model": 40, "generate": 60, "regenerate": 30, "gpu_tests": 90,
             "throughput_baseline": 50, "unet_sweep": 35, "audit": 85, "unet_compile": 90, "throughput_best": 35},
)
DRY = Sizes(
    tiny=True, correctness_steps=4, per_prompt=16, batch_correctness=2, kill_after=4,
    steps=4, batch=2, rounds=1, sweep_batches=(1, 2), unet_iters=2, compile_backend="eager",
    audit_generations=40, audit_size=64, total_s=240.0,
    budgets={"environment": 30, "build_model": 40, "generate": 90, "regenerate": 30, "gpu_tests": 90,
             "throughput_baseline": 40, "unet_sweep": 30, "audit": 40, "unet_compile": 60, "throughput_best": 30},
)


class StepTimeout(BaseException):
    """A step ran past its budget (a BaseException, so no library's ``except Exception`` swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise StepTimeout in the main thread after ``seconds`` (SIGALRM); an outer alarm is put back after."""
    def on_alarm(signum, frame):
        raise StepTimeout(f"stopped after its {seconds:.0f} s budget")

    old = signal.signal(signal.SIGALRM, on_alarm)
    outer, interval = signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 0.001), interval)


def _tests_path() -> None:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


def peak_tflops(name: str | None) -> float | None:
    """The published dense fp16/bf16 peak of a GPU by name, None when it is not in PEAK_TFLOPS."""
    for key, value in PEAK_TFLOPS:
        if name and key.lower() in name.lower():
            return value
    return None


def _free_memory() -> None:
    """Drop what a finished (or stopped) step left: pipelines it loaded, cached GPU blocks."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------- the run
class Check:
    """Runs the steps in order, each under its budget, and keeps the report (rewritten after each step)."""

    def __init__(self, sizes: Sizes, device: str, out: Path, dry_run: bool):
        self.sizes, self.device, self.out, self.dry_run = sizes, device, out, dry_run
        self.start = self._step_t0 = time.perf_counter()
        self.tmp = Path(tempfile.mkdtemp(prefix="memaudit-gpu-check-"))
        self.state: dict[str, Any] = {}  # what later steps use: model folder, workspaces, loaded pipeline, choices
        self.report: dict[str, Any] = {
            "check": "gpu_check", "dry_run": dry_run, "device": device,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished_at": None, "elapsed_s": None,
            "sizes": {k: v for k, v in sizes.__dict__.items()}, "anchors_a100_sd15": ANCHORS_A100,
            "environment": {}, "steps": {},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def write(self) -> None:
        self.report["elapsed_s"] = round(self.elapsed(), 2)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        os.replace(tmp, self.out)

    def run(self, name: str, fn: Callable[["Check", dict], None]) -> None:
        budget = min(self.sizes.budgets[name], self.sizes.total_s - self.elapsed())
        rec: dict[str, Any] = {"status": "running", "budget_s": round(budget, 1), "checks": {}}
        self.report["steps"][name] = rec
        if budget < min(5.0, self.sizes.budgets[name]):
            rec.update(status="skipped", error=f"less than 5 s left of the check's {self.sizes.total_s:.0f} s")
        else:
            self.write()
            print(f"[{self.elapsed():6.1f} s] {name}: running (budget {budget:.0f} s)", flush=True)
            t0 = self._step_t0 = time.perf_counter()
            try:
                with time_limit(budget):
                    fn(self, rec)
                rec["status"] = "passed" if all(rec["checks"].values()) else "failed"
                if rec["status"] == "failed":
                    rec["error"] = "failed checks: " + ", ".join(k for k, ok in rec["checks"].items() if not ok)
            except StepTimeout as e:
                rec.update(status="timeout", error=str(e))
            except Exception as e:  # a broken step is reported, and the others still run
                rec.update(status="error", error=f"{type(e).__name__}: {e}".strip()[:2000],
                           traceback=traceback.format_exc()[-4000:])
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            _free_memory()
        self.write()
        line = f"[{self.elapsed():6.1f} s] {name}: {rec['status']}"
        if rec.get("summary"):
            line += f" - {rec['summary']}"
        if rec.get("error"):
            line += f" ({rec['error'].splitlines()[0][:300]})"
        print(line, flush=True)

    def remaining(self, rec: dict) -> float:
        """Seconds left of the running step's budget."""
        return rec["budget_s"] - (time.perf_counter() - self._step_t0)

    def finish(self) -> int:
        self.report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.write()
        shutil.rmtree(self.tmp, ignore_errors=True)
        print_summary(self.report)
        print(f"wrote {self.out}")
        return 0 if all(r["status"] == "passed" or r.get("left_out") for r in self.report["steps"].values()) else 1


def print_summary(report: dict) -> None:
    env = report["environment"]
    title = (f"GPU check{' (dry run on the CPU: figures mean nothing)' if report['dry_run'] else ''}: "
             f"{env.get('gpu') or env.get('cpu')}, driver {env.get('driver')}, torch {env.get('torch')}, "
             f"diffusers {env.get('diffusers')}, {report['elapsed_s']:.0f} s")
    rows = []
    for name, rec in report["steps"].items():
        figures = rec.get("summary", "")
        if rec.get("error"):
            figures = (figures + "; " if figures else "") + rec["error"].splitlines()[0][:160]
        rows.append({"step": name, "status": rec["status"], "seconds": rec.get("seconds", 0.0), "figures": figures})
    print()
    print(title)
    widths = [max(len(c), *(len(fmt(r[c])) for r in rows)) for c in ("step", "status", "seconds")]
    print("  ".join(c.ljust(w) for c, w in zip(("step", "status", "seconds"), widths)) + "  figures")
    for r in rows:
        print("  ".join(fmt(r[c]).ljust(w) for c, w in zip(("step", "status", "seconds"), widths)) + "  " + str(r["figures"]))
    print()


# ---------------------------------------------------------------------------------- correctness
def step_environment(check: Check, rec: dict) -> None:
    import diffusers
    import numpy as np
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_model(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(), "gpu": None, "driver": None,
    }
    if check.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                   driver=_driver_version(), peak_tflops=peak_tflops(props.name))
        n, dtype, reps = 8192, torch.bfloat16, 10
    else:
        env["peak_tflops"] = None
        n, dtype, reps = 256, torch.float32, 3
    a = torch.randn(n, n, device=check.device, dtype=dtype)
    b = torch.randn(n, n, device=check.device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(check.device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(check.device)
    env["matmul_tflops_measured"] = round(2 * n**3 * reps / (time.perf_counter() - t0) / 1e12, 2)
    env["matmul"] = f"{n} x {n} x {n} {str(dtype).replace('torch.', '')}, mean of {reps} after 3 warm-ups"
    del a, b
    check.report["environment"] = env
    rec["checks"]["device_usable"] = True
    rec["summary"] = (f"{env['gpu'] or env['cpu']}; driver {env['driver']}; peak {env['peak_tflops'] or 'unknown'} TFLOP/s; "
                      f"matmul {env['matmul_tflops_measured']} TFLOP/s measured")


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # no NVML: the driver version is simply unknown
        return None


def gpu_test_files() -> list[Path]:
    """The test modules that hold tests marked gpu."""
    return sorted(p for p in TESTS.glob("test_*.py") if "mark.gpu" in p.read_text(encoding="utf-8"))


def start_gpu_tests(check: Check) -> None:
    """Start ``pytest -m gpu`` in the background (it overlaps the model building and generation steps)."""
    files = gpu_test_files()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    argv = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "gpu", *map(str, files)]
    log = open(check.tmp / "pytest.log", "w+")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    check.state["pytest"] = (proc, log, files, time.perf_counter())


def stop_gpu_tests(check: Check) -> None:
    proc, log, _, _ = check.state.pop("pytest", (None, None, None, None))
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if log is not None:
        log.close()


def step_gpu_tests(check: Check, rec: dict) -> None:
    proc, log, files, started = check.state["pytest"]
    rec["files"] = [p.name for p in files]
    wait = check.sizes.budgets["gpu_tests"] - (time.perf_counter() - started)
    try:
        proc.wait(timeout=max(wait, 0.1))
    except subprocess.TimeoutExpired:
        stop_gpu_tests(check)
        raise StepTimeout(f"pytest ran past the step's {check.sizes.budgets['gpu_tests']:.0f} s budget") from None
    rec["pytest_s"] = round(time.perf_counter() - started, 2)
    log.seek(0)
    tail = log.read().strip().splitlines()
    stop_gpu_tests(check)
    counts = _pytest_counts(tail[-1] if tail else "")
    rec.update(exit_code=proc.returncode, output_tail="\n".join(tail[-25:]), **counts)
    rec["checks"]["pytest_exit_0"] = proc.returncode == 0
    rec["checks"]["gpu_tests_found"] = counts["passed"] + counts["skipped"] > 0
    if check.device == "cuda":
        rec["checks"]["none_skipped_on_cuda"] = counts["skipped"] == 0
    rec["summary"] = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
                      f"({len(files)} files, {rec['pytest_s']} s in the background)")


def _pytest_counts(line: str) -> dict[str, int]:
    import re

    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", line):
        counts["errors" if word.startswith("error") else word] += int(number)
    return counts


def step_build_model(check: Check, rec: dict) -> None:
    _tests_path()
    from tiny_models import build_sd15

    dtype = "float16" if check.device == "cuda" else "float32"
    t0 = time.perf_counter()
    folder = build_sd15(check.tmp / "sd15", tiny=check.sizes.tiny, device=check.device, dtype=dtype)
    rec["build_s"] = round(time.perf_counter() - t0, 2)
    weights = sorted(p for p in folder.rglob("*.safetensors"))
    rec["weights_mb"] = {p.parent.name: round(p.stat().st_size / 2**20, 1) for p in weights}
    rec["architecture"] = "tiny SD 1.5 blocks (64 x 64)" if check.sizes.tiny else "Stable Diffusion 1.5 (512 x 512)"
    rec["saved_dtype"] = dtype
    check.state["model"] = folder
    rec["checks"]["model_index_written"] = (folder / "model_index.json").is_file()
    rec["checks"]["unet_text_encoder_vae_saved"] = {"unet", "vae", "text_encoder"} <= set(rec["weights_mb"])
    rec["summary"] = f"{rec['architecture']}, {sum(rec['weights_mb'].values()):.0f} MB of {dtype} weights in {rec['build_s']} s"


def _rows(ws: Path) -> list[dict]:
    con = sqlite3.connect(ws / "audit.db", timeout=30)
    try:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute("SELECT g.id, g.path, g.seed, g.params, p.text FROM generations g "
                                             "JOIN prompts p ON p.id = g.prompt_id ORDER BY g.id")]
    finally:
        con.close()


def _stored_pixels(ws: Path, rel: str):
    import numpy as np
    from PIL import Image

    with Image.open(ws / rel) as im:
        return np.asarray(im.convert("RGB"))


def _cli_json(rec: dict, check: Check, *argv: object) -> dict:
    _tests_path()
    from reliability import cli

    done = cli(*argv, "--json", timeout=max(5.0, check.remaining(rec) - 2))
    if done.returncode != 0:
        raise RuntimeError(f"memaudit {argv[0]} exited {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}")
    return json.loads(done.stdout)


def _prompts_file(check: Check) -> Path:
    path = check.tmp / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


def _image_stats(ws: Path) -> list[dict]:
    stats = []
    for r in _rows(ws):
        px = _stored_pixels(ws, r["path"])
        stats.append({"mean": round(float(px.mean()), 2), "std": round(float(px.std()), 2), "max": int(px.max()),
                      "size": list(px.shape[:2]), "dtype": json.loads(r["params"])["dtype"]})
    return stats


def _cli_in_process(*argv: object) -> dict:
    """``memaudit ARGV --json`` through core.cli.main in this process; its JSON output."""
    import io

    from core.cli import main as memaudit

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = memaudit([*map(str, argv), "--json"])
    if code != 0:
        raise RuntimeError(f"memaudit {argv[0]} exited {code}")
    return json.loads(buf.getvalue())


def step_generate(check: Check, rec: dict) -> None:
    """``memaudit generate`` killed with SIGKILL after some rows, checked, rerun to the end, checked again."""
    _tests_path()
    from reliability import assert_consistent, kill_when, scalar

    s = check.sizes
    ws = check.tmp / "ws-generate"
    _cli_json(rec, check, "init", ws)
    argv = ["generate", ws, "--model", check.state["model"], "--prompts", _prompts_file(check),
            "--per-prompt", s.per_prompt, "--steps", s.correctness_steps, "--guidance", GUIDANCE,
            "--batch-size", s.batch_correctness, "--seed", 0, "--device", check.device]
    total = len(PROMPTS) * s.per_prompt
    t0 = time.perf_counter()
    kill_when(argv, lambda: scalar(ws / "audit.db", "SELECT COUNT(*) FROM generations") >= s.kill_after,
              what=f"{s.kill_after} rows", timeout=max(5.0, check.remaining(rec) - 25))
    rec["killed_after_s"] = round(time.perf_counter() - t0, 2)
    kept = scalar(ws / "audit.db", "SELECT COUNT(*) FROM generations")
    rec["killed_after_rows"] = kept
    rec["checks"]["killed_mid_run"] = s.kill_after <= kept < total
    verify = assert_consistent(ws, just_killed=True)  # raises AssertionError, naming what is wrong, otherwise
    rec["verify_after_kill"] = {"ok": verify["ok"], "checked_files": verify["checked_files"],
                                "missing": verify["missing"], "orphans": len(verify["orphans"])}
    rec["checks"]["consistent_after_kill"] = verify["ok"]
    t0 = time.perf_counter()
    report = _cli_in_process(*argv)  # the rerun: the same command (in this process, as tests/test_crash.py does)
    rec["rerun_s"] = round(time.perf_counter() - t0, 2)
    rec["rerun"] = {"skipped_existing": report["skipped_existing"], "generated": report["generated"]}
    rec["checks"]["rerun_exact_counts"] = (report["skipped_existing"], report["generated"]) == (kept, total - kept)
    rec["checks"]["consistent_after_rerun"] = assert_consistent(ws)["ok"]
    check.state["ws_generate"] = ws

    stats = _image_stats(ws)
    rec["images"] = stats
    rec["dtype"] = sorted({st["dtype"] for st in stats})
    size = 64 if s.tiny else 512
    rec["checks"]["all_generated"] = len(stats) == total
    rec["checks"]["half_precision_on_cuda"] = rec["dtype"] == (["float16"] if check.device == "cuda" else ["float32"])
    rec["checks"]["size"] = all(st["size"] == [size, size] for st in stats)
    # memaudit refuses to store non-finite pixels, so a stored row is finite; black would mean NaN turned to 0
    rec["checks"]["none_black"] = all(st["max"] > 2 for st in stats)
    rec["checks"]["not_constant"] = all(st["std"] > 0.5 for st in stats)
    rec["summary"] = (f"killed at {kept}/{total} rows, verify ok, rerun skipped {report['skipped_existing']} and made "
                      f"{report['generated']}; {len(stats)} images {size} x {size} {'/'.join(rec['dtype'])}, pixel means "
                      f"{min(st['mean'] for st in stats):.0f}-{max(st['mean'] for st in stats):.0f}, "
                      f"std >= {min(st['std'] for st in stats):.1f}")


def _loaded(check: Check):
    """memaudit's own pipeline for the model (core.generate.load_pipeline: fp16 on CUDA), loaded once."""
    from core.generate import load_pipeline

    if "loaded" not in check.state:
        check.state["loaded"] = load_pipeline(str(check.state["model"]), check.device)
    return check.state["loaded"]


def step_regenerate(check: Check, rec: dict) -> None:
    import numpy as np

    from core.generate import generate, regenerate
    from core.store import Workspace

    ws_root = check.state["ws_generate"]
    ws = Workspace.open(ws_root)
    t0 = time.perf_counter()
    loaded = _loaded(check)
    rec["load_s"] = round(time.perf_counter() - t0, 2)
    batched = next(r for r in _rows(ws_root) if json.loads(r["params"])["batch_position"] == 1)
    diff = np.abs(regenerate(ws, batched["id"], check.device, loaded=loaded).astype(int)
                  - _stored_pixels(ws_root, batched["path"]).astype(int))
    rec["batched_row"] = {"id": batched["id"], "max_level_difference": int(diff.max()),
                          "values_differing": int((diff > 0).sum()), "values": int(diff.size)}
    generate(ws, str(check.state["model"]), [ALONE_PROMPT], 1, steps=check.sizes.correctness_steps, guidance=GUIDANCE,
             batch_size=1, seed=7, device=check.device)
    alone = next(r for r in _rows(ws_root) if r["text"] == ALONE_PROMPT)
    diff1 = np.abs(regenerate(ws, alone["id"], check.device, loaded=loaded).astype(int)
                   - _stored_pixels(ws_root, alone["path"]).astype(int))
    rec["batch1_row"] = {"id": alone["id"], "max_level_difference": int(diff1.max()), "values_differing": int((diff1 > 0).sum())}
    rec["checks"]["batched_row_within_one_level"] = rec["batched_row"]["max_level_difference"] <= 1
    rec["checks"]["batch1_row_exact"] = rec["batch1_row"]["max_level_difference"] == 0
    rec["summary"] = (f"batch-1 row: max difference {diff1.max()} levels; batched row: {diff.max()} levels on "
                      f"{rec['batched_row']['values_differing']} of {diff.size} values")


# ---------------------------------------------------------------------------------- throughput
def _call_plain(loaded, n: int, steps: int, seed: int, per_image_cpu: bool, device: str):
    import torch

    if per_image_cpu:
        generator = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    else:
        generator = torch.Generator(device).manual_seed(seed)
    kwargs = {}
    if loaded.size is not None:
        kwargs["height"], kwargs["width"] = loaded.size
    with torch.inference_mode():
        loaded.pipeline([PROMPTS[0]] * n, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=generator,
                        output_type="np", **kwargs)


def _call_sample(loaded, n: int, steps: int, seed: int):
    from core.generate import sample

    sample(loaded, [(PROMPTS[0], None)] * n, list(range(seed, seed + n)), steps=steps, guidance=GUIDANCE)


def step_throughput_baseline(check: Check, rec: dict) -> None:
    from core.generate import generate
    from core.store import Workspace

    s, dev = check.sizes, check.device
    loaded = _loaded(check)
    ws = Workspace.init(check.tmp / "ws-throughput")
    b = s.batch
    marks: list[float] = []

    def run_generate(steps: int, seed: int) -> float:
        """Seconds from the first batch to the end (load excluded: a long run loads once)."""
        marks.clear()
        generate(ws, str(check.state["model"]), [PROMPTS[0]], b, steps=steps, guidance=GUIDANCE, batch_size=b,
                 seed=seed, device=dev, progress=lambda done, total: marks.append(time.perf_counter()))
        return time.perf_counter() - marks[0]

    variants: dict[str, Callable[[int, int], float | None]] = {
        "plain call, one generator": lambda steps, seed: _call_plain(loaded, b, steps, seed, False, dev),
        "plain call, per-image CPU generators": lambda steps, seed: _call_plain(loaded, b, steps, seed, True, dev),
        "memaudit sample": lambda steps, seed: _call_sample(loaded, b, steps, seed),
        "memaudit generate (storing, no load)": run_generate,
    }
    rec.update(batch=b, steps=s.steps, dtype=loaded.dtype, rounds=[])
    for name, fn in variants.items():  # warm-up: kernels chosen, caches filled (generate's pipeline loads each call)
        if fn is not run_generate:
            fn(2, 10_000)
    seed = 0
    times: dict[str, list[float]] = {name: [] for name in variants}
    round_s = 0.0
    for r in range(s.rounds):
        if r and check.remaining(rec) < 1.3 * round_s:
            rec["rounds_cut"] = f"{r} of {s.rounds} rounds: the budget would not hold another"
            break
        start = time.perf_counter()
        for name, fn in variants.items():
            seed += b
            t0 = time.perf_counter()
            took = fn(s.steps, seed)
            _sync(dev)
            times[name].append(took if took is not None else time.perf_counter() - t0)
        rec["rounds"].append({name: round(v[-1], 3) for name, v in times.items()})
        check.write()
        round_s = time.perf_counter() - start
    base = statistics.median(times["plain call, one generator"])
    rec["variants"] = {name: {"median_s": round(statistics.median(v), 3), "images_per_s": round(b / statistics.median(v), 3),
                              "ratio_to_plain": round(base / statistics.median(v), 3)} for name, v in times.items()}
    gen_cost = statistics.median(times["plain call, per-image CPU generators"]) / base - 1
    rec["per_image_generators_cost"] = round(gen_cost, 4)
    rec["expectations"] = {"per_image_generators_cost_under_5_percent": gen_cost < 0.05}
    rec["checks"]["measured"] = all(len(v) >= 1 for v in times.values())
    v = rec["variants"]
    rec["summary"] = (f"batch {b}, {s.steps} steps, {loaded.dtype}: plain {v['plain call, one generator']['images_per_s']} img/s; "
                      f"sample {v['memaudit sample']['ratio_to_plain']}x, generate {v['memaudit generate (storing, no load)']['ratio_to_plain']}x, "
                      f"per-image generators cost {100 * gen_cost:+.1f}%")


def _unet_inputs(loaded, n: int, dtype, device: str):
    """A UNet input as the pipeline makes it: contiguous latents, a 0-d int64 timestep, text embeddings
    (so that a compiled UNet meets the same shapes, strides and dtypes here as in the pipeline)."""
    import torch

    unet = loaded.pipeline.unet
    h = w = int(unet.config.sample_size)
    x = torch.randn(n, int(unet.config.in_channels), h, w, device=device, dtype=dtype)
    tokens = int(loaded.pipeline.tokenizer.model_max_length)
    ctx = torch.randn(n, tokens, int(unet.config.cross_attention_dim), device=device, dtype=dtype)
    return x, torch.tensor(999, device=device), ctx


def _attention(kind: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH) if kind == "math" else contextlib.nullcontext()


def _configure(loaded, dtype_name: str, channels_last: bool) -> None:
    import torch

    unet = loaded.pipeline.unet
    unet.to(dtype=getattr(torch, dtype_name), memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _forward(unet, inputs) -> None:
    """One UNet forward with the keywords StableDiffusionPipeline passes."""
    x, t, ctx = inputs
    unet(x, t, encoder_hidden_states=ctx, timestep_cond=None, cross_attention_kwargs=None, added_cond_kwargs=None,
         return_dict=False)


def time_unet(unet, inputs, attention: str, iters: int, device: str, warmup: int = 2) -> float:
    """Seconds of one UNet forward (mean of ``iters`` after ``warmup``)."""
    import torch

    with torch.inference_mode(), _attention(attention):
        for _ in range(warmup):
            _forward(unet, inputs)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            _forward(unet, inputs)
        _sync(device)
    return (time.perf_counter() - t0) / iters


def unet_flops(loaded, device: str) -> int:
    """FLOPs of one UNet forward on one latent (attention counted through the math kernel's matrix products)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet = loaded.pipeline.unet
    inputs = _unet_inputs(loaded, 1, unet.dtype, device)
    with torch.inference_mode(), _attention("math"), FlopCounterMode(display=False) as counter:
        _forward(unet, inputs)
    return int(counter.get_total_flops())


def step_unet_sweep(check: Check, rec: dict) -> None:
    import torch

    s, dev = check.sizes, check.device
    loaded = _loaded(check)
    unet = loaded.pipeline.unet
    peak = check.report["environment"].get("peak_tflops")
    flops = unet_flops(loaded, dev)
    check.state["unet_flops"] = flops
    rec["unet_gflop_per_forward"] = round(flops / 1e9, 2)
    rec["unet_parameters"] = sum(p.numel() for p in unet.parameters())

    def measure(dtype: str, attention: str, channels_last: bool, batch: int) -> dict | None:
        """One configuration's row, or None (recorded with its error) when it does not run: out of
        memory (the math kernel at batch 16 needs about 17 GB), or no bf16 kernels on older GPUs."""
        _configure(loaded, dtype, channels_last)
        n = 2 * batch  # classifier-free guidance: the UNet sees every latent twice
        row: dict[str, Any] = {"dtype": dtype, "attention": attention, "channels_last": channels_last, "batch": batch,
                               "unet_batch": n}
        try:
            sec = time_unet(unet, _unet_inputs(loaded, n, getattr(torch, dtype), dev), attention, s.unet_iters, dev)
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rec["configs"].append(row)
            _free_memory()
            return None
        tflops = flops * n / sec / 1e12
        row.update({"ms_per_forward": round(1000 * sec, 3), "unet_it_per_s": round(1 / sec, 2),
                    "images_per_s_unet_only": round(batch / (sec * s.steps), 3), "tflops": round(tflops, 3),
                    "fraction_of_peak": round(tflops / peak, 4) if peak else None})
        rec["configs"].append(row)
        check.write()  # a run killed from outside keeps every configuration measured so far
        return row

    rec["configs"] = []
    b = s.batch
    fp16 = measure("float16", "sdpa", False, b)
    if fp16 is None:
        raise RuntimeError(f"the UNet does not run in float16 at batch {b}: {rec['configs'][0]['error']}")
    measure("float16", "math", False, b)
    bf16 = measure("bfloat16", "sdpa", False, b)
    plain = min((r for r in (fp16, bf16) if r is not None), key=lambda r: r["ms_per_forward"])
    dtype = plain["dtype"]
    cl = measure(dtype, "sdpa", True, b)
    channels_last = cl is not None and cl["ms_per_forward"] < plain["ms_per_forward"]
    sweep = []
    for batch in s.sweep_batches:
        if check.remaining(rec) < 5:
            rec["sweep_cut"] = f"stopped before batch {batch}: budget"
            break
        row = measure(dtype, "sdpa", channels_last, batch)
        if row is None:
            rec["sweep_cut"] = f"batch {batch} did not run"
            break
        sweep.append(row)
    best = max(sweep, key=lambda r: r["images_per_s_unet_only"]) if sweep else plain
    batch1 = next((r for r in sweep if r["batch"] == 1), None)
    check.state["best"] = {"dtype": dtype, "channels_last": channels_last, "batch": best["batch"],
                           "eager_ms": best["ms_per_forward"]}
    rec["best"] = dict(check.state["best"], images_per_s_unet_only=best["images_per_s_unet_only"],
                       fraction_of_peak=best["fraction_of_peak"])
    rec["unet_it_per_s_batch1"] = batch1["unet_it_per_s"] if batch1 else None
    _configure(loaded, "float16" if dev == "cuda" else "float32", False)  # back to memaudit's own configuration
    rec["checks"]["measured"] = bool(sweep)
    frac = f", {100 * best['fraction_of_peak']:.1f}% of peak" if best["fraction_of_peak"] else ""
    rec["summary"] = (f"UNet {rec['unet_gflop_per_forward']} GFLOP/forward; best {dtype}, SDPA, channels-last "
                      f"{'on' if channels_last else 'off'}, batch {best['batch']}: {best['tflops']} TFLOP/s{frac}; "
                      f"batch 1 {rec['unet_it_per_s_batch1']} it/s (UNet alone)")


def _best(check: Check) -> dict:
    """The configuration the sweep chose (memaudit's own when the sweep did not finish)."""
    return check.state.get("best") or {"dtype": "float16" if check.device == "cuda" else "float32",
                                       "channels_last": False, "batch": check.sizes.batch}


def _use_best(loaded, best: dict) -> None:
    """Put the whole pipeline in the chosen dtype, and the UNet and VAE in the chosen memory format."""
    import torch

    pipe = loaded.pipeline
    pipe.to(getattr(torch, best["dtype"]))
    memory = torch.channels_last if best["channels_last"] else torch.contiguous_format
    pipe.unet.to(memory_format=memory)
    pipe.vae.to(memory_format=memory)


def step_unet_compile(check: Check, rec: dict) -> None:
    """torch.compile the UNet, compiled through the pipeline's own call (so that the next step reuses the
    graph), then one forward timed eager and compiled at the best batch."""
    import torch

    dev, s = check.device, check.sizes
    best = _best(check)
    loaded = _loaded(check)
    _use_best(loaded, best)
    pipe = loaded.pipeline
    eager = pipe.unet
    b = best["batch"]
    rec.update(backend=s.compile_backend, batch=b, dtype=best["dtype"], channels_last=best["channels_last"])
    compiled = torch.compile(eager, backend=s.compile_backend)
    pipe.unet = compiled
    try:
        t0 = time.perf_counter()
        _call_sample(loaded, b, 2, 60_000)
        _sync(dev)
        rec["first_call_s"] = round(time.perf_counter() - t0, 2)  # compiling, then 2 steps
        t0 = time.perf_counter()
        _call_sample(loaded, b, 2, 60_100)
        _sync(dev)
        rec["second_call_s"] = round(time.perf_counter() - t0, 2)  # 2 steps, no compiling
        rec["compile_s"] = round(rec["first_call_s"] - rec["second_call_s"], 2)
        inputs = _unet_inputs(loaded, 2 * b, getattr(torch, best["dtype"]), dev)
        eager_s = time_unet(eager, inputs, "sdpa", s.unet_iters, dev)
        compiled_s = time_unet(compiled, inputs, "sdpa", s.unet_iters, dev)
    except StepTimeout:
        torch._dynamo.reset()
        raise
    finally:
        pipe.unet = eager
    rec.update(eager_ms=round(1000 * eager_s, 3), compiled_ms=round(1000 * compiled_s, 3),
               speedup=round(eager_s / compiled_s, 3))
    pays = eager_s / compiled_s > 1.03
    rec["used_for_best"] = pays
    if pays:
        check.state["compiled_unet"] = compiled
    rec["checks"]["compiled_and_ran"] = True
    rec["summary"] = (f"{s.compile_backend} at batch {b}: compile {rec['compile_s']} s, "
                      f"{rec['speedup']}x eager ({'used' if pays else 'not used'})")


def step_throughput_best(check: Check, rec: dict) -> None:
    dev, s = check.device, check.sizes
    best = _best(check)
    loaded = _loaded(check)
    _use_best(loaded, best)
    pipe = loaded.pipeline
    compiled = check.state.get("compiled_unet")
    eager = pipe.unet
    if compiled is not None:
        pipe.unet = compiled
    b = best["batch"]
    rec.update(dtype=best["dtype"], attention="sdpa", channels_last=best["channels_last"], compiled=compiled is not None,
               batch=b, steps=s.steps)
    try:
        _call_sample(loaded, b, 2, 50_000)  # warm-up at this batch
        t0 = time.perf_counter()
        _call_sample(loaded, b, s.steps, 0)
        _sync(dev)
        sec = time.perf_counter() - t0
    finally:
        pipe.unet = eager
    flops = check.state.get("unet_flops") or unet_flops(loaded, dev)
    peak = check.report["environment"].get("peak_tflops")
    unet_tflops = flops * 2 * b * s.steps / sec / 1e12
    rec.update(seconds_per_call=round(sec, 3), images_per_s=round(b / sec, 3), it_per_s=round(s.steps / sec, 2),
               unet_tflops=round(unet_tflops, 3), fraction_of_peak=round(unet_tflops / peak, 4) if peak else None)
    measured = check.report["environment"].get("matmul_tflops_measured")
    if measured:
        rec["fraction_of_measured_matmul"] = round(unet_tflops / measured, 4)
    baseline = check.report["steps"].get("throughput_baseline", {}).get("variants", {}).get("memaudit sample")
    if baseline:
        rec["speedup_over_memaudit_default"] = round(rec["images_per_s"] / baseline["images_per_s"], 3)
    rec["checks"]["measured"] = sec > 0
    frac = f", UNet at {100 * rec['fraction_of_peak']:.1f}% of peak" if rec["fraction_of_peak"] else ""
    rec["summary"] = (f"{best['dtype']}, SDPA, channels-last {'on' if best['channels_last'] else 'off'}, "
                      f"{'compiled' if compiled is not None else 'eager'}, batch {b}: {rec['images_per_s']} img/s "
                      f"({rec['it_per_s']} it/s){frac}")


# ---------------------------------------------------------------------------------- the audit
def step_audit(check: Check, rec: dict) -> None:
    import numpy as np

    from benchmarks.workspaces import build_workspace
    from core.audit import audit_device, run_audit
    from core.rethreshold import RunCache
    from core.store import Workspace

    s = check.sizes
    t0 = time.perf_counter()
    built = build_workspace(check.tmp / "ws-audit", 1, s.audit_generations, plant_every=1, size=s.audit_size)
    rec["build_s"] = round(time.perf_counter() - t0, 2)
    rec["generations"], rec["size"], rec["planted_clique"] = s.audit_generations, s.audit_size, list(built.planted.values())
    ws = Workspace.open(built.root)
    runs = {}
    gpu_key = "cuda" if check.device == "cuda" else "auto"
    for setting in (gpu_key, "cpu"):  # the GPU first: a run stopped by its budget still has the GPU's figures
        ws.set_setting("audit_device", setting)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        run_id = run_audit(ws, timings=timings)
        sec = time.perf_counter() - t0
        runs[setting] = run_id
        rec[setting] = {"device": audit_device(setting), "seconds": round(sec, 3), "prompts_per_minute": round(60 / sec, 2),
                        "stages_s": {k: round(v, 3) for k, v in timings.items()}}
        check.write()
    ws.set_setting("audit_device", "cpu")
    cpu_key = "cpu"
    rec["ratio_cpu_to_gpu"] = round(rec[cpu_key]["seconds"] / rec[gpu_key]["seconds"], 3)
    rec["distances_ratio_cpu_to_gpu"] = round(rec[cpu_key]["stages_s"]["distances"] / max(rec[gpu_key]["stages_s"]["distances"], 1e-9), 3)
    a, b = RunCache(ws, runs[cpu_key]), RunCache(ws, runs[gpu_key])
    diffs, zeros_agree, diagonal = {}, True, True
    for g in a.grids:
        pid = int(a.prompt_ids[0])
        da, db = a.distances(pid, g), b.distances(pid, g)
        diffs[g] = float(np.abs(da - db).max())
        zeros_agree &= bool(np.array_equal(da == 0, db == 0))
        diagonal &= bool(np.all(np.diag(db) == 0))
    rec["max_distance_difference"] = {str(g): d for g, d in diffs.items()}
    rec["max_neighbour_l2_difference"] = float(np.abs(a.nn_l2 - b.nn_l2).max())
    verdict = lambda c: [(r.largest_clique, r.flagged, r.extracted) for r in c.recount(0.1, 10, 0.15).prompts]  # noqa: E731
    rec["verdicts"] = {"cpu": verdict(a), "gpu": verdict(b)}
    rec["checks"]["distances_within_1e-4"] = max(diffs.values()) <= 1e-4 and rec["max_neighbour_l2_difference"] <= 1e-4
    rec["checks"]["identical_images_exactly_0"] = zeros_agree and diagonal
    rec["checks"]["same_verdicts"] = verdict(a) == verdict(b)
    rec["checks"]["planted_clique_flagged"] = verdict(b)[0][1]
    rec["summary"] = (f"1 prompt x {s.audit_generations} at {s.audit_size} px: {rec[cpu_key]['seconds']:.2f} s on cpu, "
                      f"{rec[gpu_key]['seconds']:.2f} s on {rec[gpu_key]['device']} ({rec['ratio_cpu_to_gpu']}x; distances "
                      f"{rec['distances_ratio_cpu_to_gpu']}x), {rec[gpu_key]['prompts_per_minute']} prompts/min; "
                      f"max difference {max(diffs.values()):.1e}")


STEPS: tuple[tuple[str, Callable[[Check, dict], None]], ...] = (
    ("environment", step_environment),
    ("build_model", step_build_model),
    ("generate", step_generate),
    ("regenerate", step_regenerate),
    ("gpu_tests", step_gpu_tests),  # started in the background after "environment"
    ("throughput_baseline", step_throughput_baseline),
    ("unet_sweep", step_unet_sweep),
    ("audit", step_audit),
    ("unet_compile", step_unet_compile),
    ("throughput_best", step_throughput_best),
)
NEEDS = {"generate": "build_model", "regenerate": "generate", "throughput_baseline": "build_model", "unet_sweep": "build_model", "unet_compile": "unet_sweep",
         "throughput_best": "build_model"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON report (default benchmarks/out/gpu_check.json, "
                                                 "gpu_check_dry.json for a dry run)")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes (seconds; figures mean nothing)")
    parser.add_argument("--skip", nargs="+", default=[], metavar="STEP", choices=[name for name, _ in STEPS],
                        help="steps to leave out (reported as skipped)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU is usable here (torch {torch.__version__}); run it on a machine with an NVIDIA GPU, "
              "or pass --dry-run to rehearse it on the CPU", file=sys.stderr)
        return 2
    import warnings

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # not "cast with to()" at every dtype change of the sweep
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*", category=UserWarning)  # dynamo on diffusers
    out = args.out or OUT / ("gpu_check_dry.json" if args.dry_run else "gpu_check.json")
    check = Check(DRY if args.dry_run else FULL, "cpu" if args.dry_run else "cuda", out, args.dry_run)
    try:
        for name, fn in STEPS:
            need = NEEDS.get(name)
            why = None
            if name in args.skip:
                why = "left out (--skip)"
            elif need and check.report["steps"].get(need, {}).get("status") not in ("passed", "failed"):
                why = f"needs step {need}, which did not finish"
            elif name == "gpu_tests" and "pytest" not in check.state:
                why = "not started"
            if why:
                check.report["steps"][name] = {"status": "skipped", "error": why, "checks": {}, "left_out": name in args.skip}
                check.write()
                print(f"[{check.elapsed():6.1f} s] {name}: skipped ({why})", flush=True)
                continue
            check.run(name, fn)
            if name == "environment" and "gpu_tests" not in args.skip:
                start_gpu_tests(check)
    finally:
        stop_gpu_tests(check)
        code = check.finish()
    return code


if __name__ == "__main__":
    sys.exit(main())
