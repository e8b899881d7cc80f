"""Every dashboard page through streamlit.testing.v1.AppTest, on real workspaces.

The audited workspace is built once through core (planted copies, real audit, labels by two
reviewers: tests/dashboard_data.py); tests that write use reviewer names of their own.
"""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import audit, labels, launch, results, rethreshold, runs
from dashboard import ui
from dashboard.jobs import Job, JobRegistry
from dashboard_data import empty_workspace, ingested_copy, labelled_copy, unlabelled_workspace

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "dashboard" / "app.py")
PAGES = ("overview", "triage", "generate", "cliques", "review", "calibrate", "training", "export")


def open_app(ws=None, page: str | None = None, path: str | None = None, **state) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state[ui.WS_KEY] = path if path is not None else (str(ws.root) if ws is not None else None)
    for key, value in state.items():
        at.session_state[key] = value
    if page and page != "overview":
        at.switch_page(f"app_pages/{page}.py")
    return at.run()


def no_exception(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(elements) -> list[str]:
    return [str(e.value) for e in elements]


def metric(at: AppTest, label: str) -> str:
    found = [m.value for m in at.metric if m.label == label]
    assert found, f"no metric {label!r} among {[m.label for m in at.metric]}"
    return found[0]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return labelled_copy(tmp_path_factory, "dashboard-pages")


@pytest.fixture(scope="module")
def empty(tmp_path_factory):
    return empty_workspace(tmp_path_factory.mktemp("empty") / "ws")


# ---------------------------------------------------------------------------- missing input
@pytest.mark.parametrize("page", PAGES)
def test_every_page_without_a_workspace_says_so(page):
    at = no_exception(open_app(page=page))
    assert texts(at.info) == ["No workspace is open: start the dashboard with `memaudit dashboard WS`."]


def test_a_folder_that_is_no_workspace_is_one_error(tmp_path):
    at = no_exception(open_app(path=str(tmp_path / "nothing")))
    assert len(at.error) == 1 and "is not a memaudit workspace" in at.error[0].value


@pytest.mark.parametrize("page", ["cliques", "review", "calibrate", "export"])
def test_pages_that_need_a_run_say_so(empty, page):
    at = no_exception(open_app(empty, page))
    assert texts(at.info) == ["This workspace has no audit run yet: run one from the Overview page or with `memaudit audit WS`."]


def test_empty_workspace_overview_and_training(empty):
    at = no_exception(open_app(empty))
    assert "no audit run yet" in at.info[0].value
    assert at.button(key="overview_audit").disabled  # nothing to audit
    at = no_exception(open_app(empty, "training"))
    assert texts(at.info) == ["No training images yet: add them with `memaudit add-training WS FOLDER`."]


def test_calibrate_without_labels_says_so(tmp_path_factory):
    ws, _ = unlabelled_workspace(tmp_path_factory)
    at = no_exception(open_app(ws, "calibrate"))
    assert texts(at.info) == ["No labels yet: label candidates on the Review page first (unsure labels and ties do not count)."]


def test_overview_audits_a_workspace_that_has_no_run(tmp_path_factory):
    ws = ingested_copy(tmp_path_factory, "audit-now")
    at = no_exception(open_app(ws))
    assert metric(at, "Generations") == str(ws.counts()["generations"])
    at.button(key="overview_audit").click().run()
    ui.jobs().get((str(ws.root), "audit")).join(120)
    at.run()  # the page follows the job and reruns when it ends
    at.run()
    no_exception(at)
    assert runs.latest_run(ws) is not None
    assert metric(at, "Flagged prompts") == "4"


def test_an_unconditional_run(tiny_unconditional, tmp_path):
    """Generations without a prompt: judged one by one by relative L2, reviewed without cliques."""
    from core.generate import generate
    from core.training import add_training
    from workspaces import planted_files

    files = planted_files(tmp_path / "data")
    ws = empty_workspace(tmp_path / "ws")
    add_training(ws, files["train"], captions=files["captions"])
    generate(ws, str(tiny_unconditional), None, 4, steps=2, guidance=0.0, batch_size=4, seed=0, device="cpu")
    run_id = audit.run_audit(ws)
    at = no_exception(open_app(ws, "cliques"))
    assert "no text prompts" in at.info[0].value
    at = no_exception(open_app(ws, "review"))
    at.text_input(key="reviewer").input("uma").run()
    no_exception(at)
    first = labels.review_queue(ws, run_id, "uma")[0]
    assert first.prompt is None and metric(at, "Relative L2") == f"{first.relative_l2:.3f}"
    assert any(m.value.startswith("**Prompt:** (unconditional)") for m in at.markdown)
    no_exception(open_app(ws))


# ---------------------------------------------------------------------------- overview
def test_overview_numbers_come_from_the_run(planted):
    ws, run_id = planted
    ov = results.overview(ws, run_id)
    at = no_exception(open_app(ws))
    assert metric(at, "Flagged prompts") == str(ov.flagged_prompts) == "4"
    assert metric(at, "Extracted prompts") == str(ov.extracted_prompts) == "3"
    assert metric(at, "Generations") == str(ov.generations)
    assert metric(at, "Labelled") == str(ov.labelled_candidates)
    assert metric(at, "Reviewers") == "2"
    kappa, n = ov.kappa[("alice", "bob")]
    assert metric(at, "Cohen's kappa") == f"{kappa:.2f}"
    assert len(at.get("plotly_chart")) == 2  # Figure 5 and the clique-size distribution
    assert at.sidebar.selectbox[0].value == run_id


# ---------------------------------------------------------------------------- cliques
def test_cliques_recount_when_a_slider_moves(planted):
    ws, run_id = planted
    params = runs.run_params(ws, run_id)
    at = no_exception(open_app(ws, "cliques"))
    assert metric(at, "Flagged prompts") == "4" and metric(at, "Extracted prompts") == "3"
    # the first prompt's largest group is shown with its generations and nearest training images
    assert at.expander and at.expander[0].label.startswith("Group 1: ")
    assert len(at.get("image")) > 0
    # lower k to 6: the six-copy prompt is flagged too, from the cache
    at.slider(key=f"cliques_k_{run_id}").set_value(6).run()
    no_exception(at)
    assert metric(at, "Flagged prompts") == "5"
    # a tiny tau breaks every clique
    at.select_slider(key=f"cliques_tau_{run_id}").set_value(0.01).run()
    assert metric(at, "Flagged prompts") == "0"
    # a tiny delta keeps the cliques but extracts nothing
    at.select_slider(key=f"cliques_tau_{run_id}").set_value(params.edge_threshold).run()
    at.slider(key=f"cliques_delta_{run_id}").set_value(0.0).run()
    assert metric(at, "Extracted prompts") == "0" and metric(at, "Flagged prompts") == "5"


def test_cliques_grid_slider_recounts_from_the_cache(planted):
    """G 4 -> 1: plain L2 links the flat-texture trap (a fifth flagged prompt); every count and the
    neighbours' tiled L2 come from the run's cache at the chosen grid."""
    ws, run_id = planted
    params = runs.run_params(ws, run_id)
    cache = rethreshold.RunCache(ws, run_id)
    at = no_exception(open_app(ws, "cliques"))
    grid = at.select_slider(key=f"cliques_grid_{run_id}")
    assert grid.value == params.grid and list(grid.options) == [f"{g} x {g}" for g in cache.grids]
    assert metric(at, "Flagged prompts") == "4"
    at.select_slider(key=f"cliques_grid_{run_id}").set_value(1).run()
    no_exception(at)
    want = cache.recount(params.edge_threshold, params.min_clique, params.delta, grid=1)
    assert want.flagged == 5 and "flat trap" in {r.prompt for r in want.prompts if r.flagged}
    assert metric(at, "Flagged prompts") == "5" and metric(at, "Extracted prompts") == str(want.extracted)
    shown = at.dataframe[0].value
    assert list(shown["largest clique"]) == [r.largest_clique for r in want.prompts]
    assert any("tiled 1x1 " in c.value for c in at.caption)
    at.select_slider(key=f"cliques_grid_{run_id}").set_value(8).run()
    assert metric(at, "Flagged prompts") == str(cache.recount(params.edge_threshold, params.min_clique, params.delta, grid=8).flagged)


def test_cliques_of_a_run_with_one_grid_say_how_to_cache_more(tmp_path_factory):
    ws, _ = labelled_copy(tmp_path_factory, "one-grid")
    run = audit.run_audit(ws, audit.params_from(ws, grid_choices=""))
    at = no_exception(open_app(ws, "cliques"))
    assert not [s for s in at.select_slider if s.key == f"cliques_grid_{run}"]
    assert any("the only grid this run cached" in c.value for c in at.caption)
    assert metric(at, "Flagged prompts") == "4"


def test_cliques_filters(planted):
    ws, run_id = planted
    at = no_exception(open_app(ws, "cliques"))
    all_rows = len(at.dataframe[0].value)
    at.button_group(key=f"cliques_filters_{run_id}").set_value(["flagged"]).run()
    no_exception(at)
    assert len(at.dataframe[0].value) == 4 < all_rows
    at.button_group(key=f"cliques_filters_{run_id}").set_value(["flagged", "unlabelled"]).run()
    assert texts(at.info) == ["No prompt matches these filters at these thresholds."]


# ---------------------------------------------------------------------------- review
def test_review_needs_a_reviewer(planted):
    ws, _ = planted
    at = no_exception(open_app(ws, "review"))
    assert texts(at.info) == ["Enter your name as reviewer to start labelling: every label is stored with it."]


def test_review_label_is_written_once_and_undone(planted):
    ws, run_id = planted
    at = no_exception(open_app(ws, "review"))
    at.text_input(key="reviewer").input("carol").run()
    no_exception(at)
    first = labels.review_queue(ws, run_id, "carol")[0]
    assert metric(at, "L2") == f"{first.l2:.4f}"
    at.text_input(key=f"review_note_{first.id}").input("same pose").run()
    at.button(key=f"review_label_{first.id}_exact_copy").click().run()
    no_exception(at)
    mine = [e for e in labels.label_events(ws) if e.reviewer == "carol"]
    assert [(e.candidate_id, e.label, e.note) for e in mine] == [(first.id, "exact_copy", "same pose")]
    at.run()  # a plain rerun writes nothing
    assert len([e for e in labels.label_events(ws) if e.reviewer == "carol"]) == 1
    # the queue moved on to the next candidate
    assert f"review_label_{first.id}_exact_copy" not in [b.key for b in at.button]
    assert labels.review_queue(ws, run_id, "carol")[0].id != first.id
    at.button(key="review_undo").click().run()
    no_exception(at)
    mine = [e for e in labels.label_events(ws) if e.reviewer == "carol"]
    assert len(mine) == 2 and mine[1].undoes == mine[0].id
    assert labels.review_queue(ws, run_id, "carol")[0].id == first.id


def test_review_blind_mode_hides_metric_values(planted):
    ws, _ = planted
    at = no_exception(open_app(ws, "review"))
    at.text_input(key="reviewer").input("dave").run()
    assert any(m.label == "L2" for m in at.metric)
    at.toggle(key="review_blind").set_value(True).run()
    no_exception(at)
    assert not at.metric
    assert not any("alice" in c.value for c in at.caption)  # other reviewers' labels are hidden too


def test_review_buttons_have_keyboard_shortcuts(planted):
    ws, _ = planted
    at = no_exception(open_app(ws, "review"))
    at.text_input(key="reviewer").input("erin").run()
    shortcuts = {b.label: b.proto.shortcut.upper() for b in at.button}
    assert shortcuts["Exact copy"] == "1" and shortcuts["Near copy"] == "2"
    assert shortcuts["Not memorized"] == "3" and shortcuts["Unsure"] == "4" and shortcuts["Undo"] == "U"


# ---------------------------------------------------------------------------- calibrate
def test_calibrate_shows_curves_and_adopts_a_threshold(planted):
    ws, run_id = planted
    before = ws.get_setting("delta")
    try:
        at = no_exception(open_app(ws, "calibrate"))
        assert len(at.get("plotly_chart")) == 4  # distribution, precision at rank, ROC, PR
        table = at.dataframe[0].value
        assert "TPR at 1% FPR" in table.columns and "normalised L2" in list(table["metric"])
        adopt = at.button(key="adopt")
        assert adopt.label.startswith("Adopt delta = ")
        value = float(adopt.label.split("= ")[1].split(" ")[0])
        adopt.click().run()
        no_exception(at)
        assert ws.get_setting("delta") == pytest.approx(value)
        assert any("is now the workspace default" in s.value for s in at.success)
    finally:
        ws.set_setting("delta", before)


# ---------------------------------------------------------------------------- training and generate
def test_training_sends_captions_to_generate(planted):
    ws, _ = planted
    at = no_exception(open_app(ws, "training"))
    assert metric(at, "Images") == str(ws.counts()["training_images"])
    at.button(key="training_send").click().run()
    no_exception(at)
    assert at.title[0].value == "Generate"
    prompts = at.text_area(key="generate_prompts_text").value.splitlines()
    assert prompts and all(p.startswith("a photo of ") for p in prompts)


def test_generate_shows_a_bad_model_as_one_message(planted, tmp_path):
    ws, _ = planted
    at = no_exception(open_app(ws, "generate"))
    at.text_input(key="generate_model").input(str(tmp_path)).run()
    at.text_area(key="generate_prompts_text").input("a photo of coffee").run()
    at.button(key="generate_start").click().run()
    no_exception(at)
    job = ui.jobs().get((str(ws.root), "generate"))
    job.join(60)
    at.run()
    errors = texts(at.error)
    assert len(errors) == 1 and "is not a diffusers model folder" in errors[0]
    at.button(key="generate_dismiss").click().run()
    assert not at.error


def test_generate_bounds_come_from_config_and_a_prompts_file_that_is_not_utf8_is_refused_as_the_cli_does(planted, tmp_path):
    from core import config
    from core.errors import InputError
    from core.generate import read_prompts

    ws, _ = planted
    at = no_exception(open_app(ws, "generate"))
    for key, name in (("generate_per_prompt", "per_prompt"), ("generate_steps", "steps"), ("generate_guidance", "guidance"),
                      ("generate_batch", "batch_size"), ("generate_seed", "seed")):
        s, widget = config.SETTINGS[name], at.number_input(key=key)
        assert widget.min == s.minimum and widget.max == (None if s.maximum is None else min(s.maximum, ui.JS_MAX_INT)), name
        assert widget.value == ws.settings()[name]
    latin1 = "a photo of coffee\nun café noir\n".encode("latin-1")
    (tmp_path / "prompts.txt").write_bytes(latin1)
    with pytest.raises(InputError) as cli:
        read_prompts(tmp_path / "prompts.txt")
    at.file_uploader(key="generate_upload").upload("prompts.txt", latin1, "text/plain").run()
    no_exception(at)
    assert texts(at.error) == [str(cli.value).replace(str(tmp_path / "prompts.txt"), "prompts.txt")]
    assert "byte 0xe9 on line 2" in at.error[0].value
    assert "caf" not in (at.text_area(key="generate_prompts_text").value or "")  # nothing decoded with replacements
    at.file_uploader(key="generate_upload").clear()
    at.file_uploader(key="generate_upload").upload("good.txt", "a photo of coffee\nun café noir\n".encode(), "text/plain").run()
    no_exception(at)
    assert at.text_area(key="generate_prompts_text").value == "a photo of coffee\nun café noir" and not at.error


def test_generate_runs_in_the_background_and_resumes(tiny_unconditional, tmp_path):
    ws = empty_workspace(tmp_path / "ws")
    state = dict(generate_per_prompt=3, generate_steps=2, generate_batch=2, generate_device="cpu")
    at = no_exception(open_app(ws, "generate", **state))
    at.text_input(key="generate_model").input(str(tiny_unconditional)).run()
    assert at.caption[0].value.startswith("No prompts: 3 unconditional images (seeds 0–2)")
    for expected in ("Done: 3 images generated, 0 already in the workspace",
                     "Done: 0 images generated, 3 already in the workspace"):  # the second start resumes: nothing left
        at.button(key="generate_start").click().run()
        job = ui.jobs().get((str(ws.root), "generate"))
        job.join(120)
        at.run()
        no_exception(at)
        assert any(s.value.startswith(expected) for s in at.success), texts(at.success) + texts(at.error)
    assert ws.counts()["generations"] == 3
    # the model is now offered as one used in this workspace
    assert at.button_group(key="generate_known").options


def test_generate_page_shows_a_running_job_and_cancels_it(tmp_path):
    ws = empty_workspace(tmp_path / "ws")
    started = []

    def work(progress, should_stop):
        progress(2, 8)
        started.append(True)
        while not should_stop():
            time.sleep(0.01)

    job = ui.jobs().start((str(ws.root), "generate"), "generate", work)
    while not started:
        time.sleep(0.01)
    at = no_exception(open_app(ws, "generate"))
    assert at.get("progress")[0].proto.text.startswith("2 of 8 images")
    assert at.button(key="generate_start").disabled
    at.button(key="generate_cancel").click().run()
    job.join(5)
    at.run()
    no_exception(at)
    assert texts(at.warning) == ["Cancelled after 2 of 8 images: start again with the same settings to resume."]


def test_job_progress_eta_and_cancel():
    ticks = iter([0.0, 0.0, 10.0, 20.0, 20.0, 30.0, 30.0, 30.0])
    started = []

    def work(progress, should_stop):
        progress(4, 10)            # resumed: 4 already there, reported at once
        started.append(True)
        while not should_stop():
            time.sleep(0.01)
        return "stopped"

    job = Job("test", work, clock=lambda: next(ticks, 30.0))
    job.start()
    while not started:
        time.sleep(0.01)
    job._progress(6, 10)          # 2 images in 10 s -> 4 left at 0.2/s = 20 s
    s = job.status()
    assert s.running and s.done == 6 and s.eta == pytest.approx(20.0)
    job.cancel()
    job.join(5)
    s = job.status()
    assert s.state == "cancelled" and s.result == "stopped" and not s.running


def test_registry_refuses_a_second_job_and_reports_errors():
    from core.errors import InputError, MemauditError

    reg = JobRegistry()
    gate = []

    def slow(progress, should_stop):
        while not gate:
            time.sleep(0.01)

    reg.start("k", "generate", slow)
    with pytest.raises(MemauditError, match="already running"):
        reg.start("k", "generate", slow)
    gate.append(1)
    reg.get("k").join(5)

    def bad(progress, should_stop):
        raise InputError("one clear sentence")

    reg.start("k", "generate", bad).join(5)
    s = reg.get("k").status()
    assert s.state == "failed" and s.error == "one clear sentence" and s.traceback is None
    reg.forget("k")
    assert reg.get("k") is None


# ---------------------------------------------------------------------------- export
def test_export_offers_three_downloads(planted):
    ws, _ = planted
    at = no_exception(open_app(ws, "export"))
    buttons = at.get("download_button")
    assert [b.proto.label for b in buttons] == ["Download JSON", "Download CSV", "Download HTML report"]


# ---------------------------------------------------------------------------- launcher and config
def test_launcher_flags_equal_the_config_file(tmp_path):
    cfg = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    flat = {f"{section}.{name}": value for section, options in cfg.items() for name, value in options.items()}
    assert flat == launch.CONFIG
    assert flat["server.address"] == "127.0.0.1" and flat["browser.gatherUsageStats"] is False
    assert flat["server.enableXsrfProtection"] is True and flat["server.headless"] is True


def test_launcher_command(tmp_path):
    ws = empty_workspace(tmp_path / "ws")
    cmd = launch.command(ws.root, port=9123, host="127.0.0.1")
    assert cmd[1:4] == ["-m", "streamlit", "run"] and Path(cmd[4]) == launch.APP and launch.APP.is_file()
    assert "--server.port=9123" in cmd and "--server.address=127.0.0.1" in cmd
    assert "--browser.gatherUsageStats=false" in cmd
    assert cmd[-2:] == ["--", str(ws.root)]


def test_launcher_refuses_a_taken_port_and_a_missing_workspace(tmp_path):
    import socket

    from core.errors import InputError, WorkspaceError

    with pytest.raises(WorkspaceError):
        launch.launch(tmp_path / "nope")
    ws = empty_workspace(tmp_path / "ws")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(InputError, match="already in use"):
            launch.launch(ws.root, port=s.getsockname()[1])


def test_launch_open_needs_no_terminal_and_no_streamlit_home(tmp_path):
    """``memaudit demo --open`` on a fresh machine: no ~/.streamlit, no terminal (stdin /dev/null, own session).

    Streamlit stays headless (a non-headless first run asks for an email address and, with no terminal,
    exits 255); memaudit opens the browser itself, through $BROWSER here, once the health check answers."""
    import os
    import signal
    import socket
    import stat
    import subprocess
    import sys

    ws = empty_workspace(tmp_path / "ws")
    home = tmp_path / "home"
    home.mkdir()
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.py"
    # the "browser" records the URL it was given and what the health check answered at that moment
    browser.write_text(f"#!{sys.executable}\n"
                       "import sys, urllib.request\n"
                       "url = sys.argv[1]\n"
                       "ok = urllib.request.urlopen(url + '/_stcore/health', timeout=5).read().decode()\n"
                       f"with open({str(opened)!r}, 'a') as f:\n"
                       "    f.write(url + ' ' + ok + '\\n')\n")
    browser.chmod(browser.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(HOME=str(home), BROWSER=str(browser), XDG_CONFIG_HOME=str(home / ".config"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"from core.launch import launch; raise SystemExit(launch({str(ws.root)!r}, port={port}, open_browser=True))"
    log = tmp_path / "launch.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not (opened.exists() and opened.read_text().endswith("\n")):
            assert proc.poll() is None, f"the launcher exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no browser was opened:\n{log.read_text()}"
            time.sleep(0.2)
        assert opened.read_text() == f"http://127.0.0.1:{port} ok\n"  # opened once, after the health check
        assert proc.poll() is None  # still serving
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "Email" not in text and "Welcome to Streamlit" not in text, text
    assert not (home / ".streamlit" / "credentials.toml").exists()


def test_launch_open_without_a_display_prints_the_url(monkeypatch, capsys, tmp_path):
    """With nothing to open a browser with, the launcher says where the dashboard is and keeps serving."""
    started: list[dict] = []

    class Started:
        def __init__(self, cmd, *args, **kwargs):
            started.append(dict(kwargs, cmd=cmd))

        def poll(self):
            return None

        def wait(self, timeout=None):
            return 0

    ws = empty_workspace(tmp_path / "ws")
    monkeypatch.setattr(launch.subprocess, "Popen", Started)
    monkeypatch.setattr(launch, "port_free", lambda h, p: True)
    monkeypatch.setattr(launch, "wait_healthy", lambda url, proc: True)
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(launch.sys, "platform", "linux")
    assert launch.launch(ws.root, port=8597, open_browser=True) == 0
    assert "--server.headless=true" in started[0]["cmd"] and started[0]["stdin"] == launch.subprocess.DEVNULL
    assert "open http://127.0.0.1:8597 yourself" in capsys.readouterr().err


def test_launch_serves_the_workspace_and_stops_with_its_server(tmp_path):
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    ws = empty_workspace(tmp_path / "ws")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"from core.launch import launch; raise SystemExit(launch({str(ws.root)!r}, port={port}))"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        with pytest.raises(ConnectionRefusedError):  # the Streamlit child went with it
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        if proc.poll() is None:
            proc.kill()
