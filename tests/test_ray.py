"""Generation on a Ray cluster: one real local Ray instance (2 CPUs, no dashboard) for the module, tiny real pipelines."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from core import cli, cluster
from core import generate as gen
from core.errors import InputError
from core.store import Workspace

ROOT = Path(__file__).resolve().parent.parent
FAST = dict(steps=2, guidance=7.5, device="cpu")
PROMPTS = ["a red cube", "a blue ball"]


@pytest.fixture(scope="module")
def ray_address():
    pytest.importorskip("ray")
    address = cluster.start_local(num_cpus=2)
    yield address
    cluster.shutdown()


def rows(ws: Workspace) -> list[dict]:
    with ws.connect() as con:
        got = [dict(r) for r in con.execute("SELECT g.*, p.text AS prompt FROM generations g JOIN prompts p ON p.id = g.prompt_id")]
    return sorted(got, key=lambda r: (r["prompt"], r["seed"]))


def comparable(r: dict) -> dict:
    params = {k: v for k, v in json.loads(r["params"]).items() if k != "created_at"}
    return {**{k: r[k] for k in ("prompt", "seed", "path", "sha256", "width", "height", "steps", "guidance", "scheduler")},
            "params": params}


def assert_complete(ws: Workspace, expected: int) -> None:
    """Each (prompt, seed) once, each row's file complete (sha256 as recorded), no file without its row."""
    got = rows(ws)
    assert len(got) == expected and len({(r["prompt"], r["seed"]) for r in got}) == expected
    for r in got:
        assert hashlib.sha256(ws.resolve(r["path"]).read_bytes()).hexdigest() == r["sha256"]
    on_disk = {p.relative_to(ws.root).as_posix() for p in (ws.root / "generations").rglob("*") if p.is_file()}  # no temp file
    assert on_disk == {r["path"] for r in got}


def test_ray_generation_equals_the_local_run_through_a_dead_worker_and_a_resume(tmp_path, tiny_text2image, ray_address):
    """The one end-to-end proof (Ray's start-up makes each run slow here): a worker process exits in the middle of a
    batch and is restarted, the run is stopped and resumed, and the result is the local run's, byte for byte."""
    from core.generate_ray import generate_on_ray

    local, remote = Workspace.init(tmp_path / "local"), Workspace.init(tmp_path / "ray")
    gen.generate(local, str(tiny_text2image), PROMPTS, 5, batch_size=3, seed=7, **FAST)
    marker, handed, done = tmp_path / "worker-died", [], []

    def stop_after_two() -> bool:  # asked before each batch is handed out: the first two go, then the run stops
        handed.append(1)
        return len(handed) > 2

    # 10 images in batches of 3, 3, 3, 1 (the local run's cut); a worker exits right after writing its 2nd image
    first = generate_on_ray(remote, str(tiny_text2image), PROMPTS, 5, batch_size=3, seed=7, address=ray_address,
                            workers=2, progress=lambda d, t: done.append((d, t)), should_stop=stop_after_two,
                            fault=(2, str(marker)), **FAST)
    assert marker.exists()
    assert (first.planned, first.generated, first.stopped) == (10, 6, True)
    assert done == [(0, 10), (3, 10), (6, 10)]
    assert_complete(remote, 6)
    second = generate_on_ray(remote, str(tiny_text2image), PROMPTS, 5, batch_size=3, seed=7, address=ray_address,
                             workers=2, **FAST)
    assert (second.skipped_existing, second.generated, second.stopped) == (6, 4, False)
    a, b = rows(local), rows(remote)
    assert [comparable(r) for r in a] == [comparable(r) for r in b]  # same names, hashes, batch positions, provenance
    for ra, rb in zip(a, b):
        assert local.resolve(ra["path"]).read_bytes() == remote.resolve(rb["path"]).read_bytes()
    assert_complete(remote, 10)


@pytest.mark.slow
def test_a_killed_driver_is_resumed_by_the_same_command(tmp_path, tiny_text2image, ray_address):
    """`memaudit generate --ray ADDRESS` joins the running cluster; SIGKILL it mid-run, run it again."""
    ws = Workspace.init(tmp_path / "ws")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cmd = [sys.executable, "-m", "core.cli", "generate", str(ws.root), "--model", str(tiny_text2image), "--prompts",
           str(prompts), "--per-prompt", "12", "--batch-size", "2", "--steps", "2", "--device", "cpu",
           "--ray", ray_address, "--ray-workers", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(rows(ws)) < 4 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stored = len(rows(ws))
    assert 4 <= stored < 24
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"({stored} already in the workspace)" in done.stdout
    assert_complete(ws, 24)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_that_does_not_answer_is_one_line_and_leaves_the_workspace(tmp_path, tiny_unconditional):
    pytest.importorskip("ray")
    ws = Workspace.init(tmp_path / "ws")
    before = ws.db_path.read_bytes()
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "core.cli", "generate", str(ws.root), "--model", str(tiny_unconditional),
                           "--ray", f"127.0.0.1:{_free_port()}"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memaudit: error: no Ray cluster answers at 127.0.0.1:"), done.stderr
    assert time.monotonic() - t0 < 60
    assert ws.db_path.read_bytes() == before and not any((ws.root / "generations").rglob("*"))


def test_without_ray_the_flag_says_how_to_install_it(tmp_path, tiny_unconditional, monkeypatch, capsys):
    ws = Workspace.init(tmp_path / "ws")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    assert cli.main(["generate", str(ws.root), "--model", str(tiny_unconditional), "--ray"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["memaudit: error: --ray needs Ray, which is not installed here; install it with: pip install 'memaudit[ray]'"]


def test_ray_address_is_checked_like_every_setting(tmp_path, tiny_unconditional, capsys):
    assert [cluster.parse_address(a) for a in ("", " AUTO ", "local", "10.0.0.5:6379", "head-node:6379", "[::1]:6379")] == \
        ["", "auto", "local", "10.0.0.5:6379", "head-node:6379", "[::1]:6379"]
    for bad in ("10.0.0.5", "head:0", "head:70000", "a b:1"):
        with pytest.raises(ValueError, match="ray_address must be auto, local or HOST:PORT"):
            cluster.parse_address(bad)
    ws = Workspace.init(tmp_path / "ws")
    assert cli.main(["generate", str(ws.root), "--model", str(tiny_unconditional), "--ray", "head-node"]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    ws.set_setting("ray_address", "local")
    assert ws.settings()["ray_address"] == "local"
    with pytest.raises(ValueError):
        ws.set_setting("ray_workers", -1)


def test_a_cuda_device_on_a_cluster_without_gpus_is_refused(ray_address):
    with pytest.raises(InputError, match="has no GPU"):
        cluster.slots("cuda")
    assert cluster.slots("auto") == ("CPU", 2)


def test_identical_pixels_already_stored_get_their_own_file_as_in_the_local_run(tmp_path, tiny_unconditional):
    """A worker cannot see the database: when another row already names the worker's file (identical pixels),
    the driver gives the new row its own copy, the name the local run would have chosen."""
    from core.generate_ray import claim_path, content_path

    ws = Workspace.init(tmp_path / "ws")
    gen.generate(ws, str(tiny_unconditional), None, 1, batch_size=1, seed=0, **FAST)
    (stored,) = rows(ws)
    data = ws.resolve(stored["path"]).read_bytes()
    folder, stem = stored["path"].rsplit("/", 1)
    assert content_path(ws.root, folder, stem[:-4], data) == stored["path"]  # the same bytes: the same name
    assert content_path(ws.root, folder, stem[:-4], data + b"x") == f"{folder}/{stem[:-4]}-2.png"  # other bytes: not over them
    twin = dict(stored, steps=stored["steps"] + 1)  # another generation that came out with the same pixels
    claimed = claim_path(ws, twin)
    assert claimed["path"] == f"{folder}/{stem[:-4]}-2.png" == gen.free_path(ws, folder, stem[:-4])
    assert ws.resolve(claimed["path"]).read_bytes() == data and ws.resolve(stored["path"]).read_bytes() == data


def test_an_audit_on_ray_is_the_local_audit(tmp_path, ray_address, monkeypatch):
    """Text prompts (distances, cliques, tau curves) and an unconditional model's generations in chunks, run by Ray
    actors: the run's cache arrays and stored results equal the local run's, number for number."""
    from test_unconditional import cache_arrays, mixed_workspace, stored

    from core import audit, config, results

    ws = mixed_workspace(tmp_path)
    monkeypatch.setattr(config, "AUDIT_CHUNK_BYTES", 16 * 64 * 64 * 3 * 4)  # the unconditional 49 in 4 chunks
    params = audit.params_from(ws, relative_n=5, working_size=64)
    local = audit.run_audit(ws, params)
    seen = []
    on_ray = audit.run_audit(ws, params, ray_address=ray_address, progress=lambda s, d, t: seen.append(d))
    a, b = cache_arrays(ws, local), cache_arrays(ws, on_ray)
    assert a.keys() == b.keys() and any(k.startswith("prompt-") for k in a)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    with np.load(ws.root / "cache" / f"run-{local}" / "curves.npz") as x, np.load(ws.root / "cache" / f"run-{on_ray}" / "curves.npz") as y:
        for name in x.files:
            np.testing.assert_array_equal(x[name], y[name], err_msg=name)
    assert stored(ws, local) == stored(ws, on_ray)
    assert results.count_summary(ws, local) | {"run_id": 0} == results.count_summary(ws, on_ray) | {"run_id": 0}
    assert seen[-1] == ws.counts()["generations"]


def test_an_audit_with_an_address_that_does_not_answer_says_so_in_one_line(tmp_path):
    pytest.importorskip("ray")
    ws = Workspace.init(tmp_path / "ws")
    before = ws.db_path.read_bytes()
    done = subprocess.run([sys.executable, "-m", "core.cli", "audit", str(ws.root), "--ray", f"127.0.0.1:{_free_port()}"],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("memaudit: error: no Ray cluster answers at 127.0.0.1:")
    assert ws.db_path.read_bytes() == before
