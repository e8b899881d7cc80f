"""The training set stays private: the dashboard listens on loopback with XSRF protection unless told
otherwise, no URL and no path stored in the database reads a file outside the workspace, and the
secrets a sign-in would need are never committed.
"""

from __future__ import annotations

import ast
import http.client
import inspect
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import images, launch, views
from core.errors import InputError, MemauditError, WorkspaceError
from core.store import Workspace
from reliability import ENV, ROOT, small_audited_workspace
from servers import free_port, running_dashboard

LOOPBACK = "127.0.0.1"


# ---------------------------------------------------------------------------- server settings
def test_checkout_config_binds_loopback_with_xsrf_and_no_telemetry():
    cfg = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["address"] == LOOPBACK
    assert cfg["server"]["enableXsrfProtection"] is True
    assert cfg["browser"]["gatherUsageStats"] is False
    assert cfg["server"].get("enableCORS", True) is True  # never switched off
    assert cfg["server"].get("enableStaticServing", False) is False  # no folder is served as files


def test_launcher_and_cli_default_to_loopback():
    from core.cli import build_parser

    assert inspect.signature(launch.launch).parameters["host"].default == LOOPBACK
    assert inspect.signature(launch.command).parameters["host"].default == LOOPBACK
    cmd = launch.command(ROOT)
    assert f"--server.address={LOOPBACK}" in cmd and "--server.enableXsrfProtection=true" in cmd
    assert "--browser.gatherUsageStats=false" in cmd
    assert not [a for a in cmd if a.startswith(("--server.enableCORS=false", "--server.enableStaticServing=true"))]
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    host = next(a for a in sub.choices["dashboard"]._actions if a.dest == "host")
    assert host.default == LOOPBACK and "exposes" in host.help


def _launch_output(monkeypatch, capsys, tmp_path, host: str) -> tuple[str, list[str]]:
    """What ``launch`` prints for ``host``, and the command it would start (no server is started)."""
    started: list[list[str]] = []

    class Started:
        def __init__(self, cmd, *args, **kwargs):
            started.append(cmd)

        def wait(self, timeout=None):
            return 0

    ws = Workspace.init(tmp_path / f"ws-{host.replace(':', '_')}")
    monkeypatch.setattr(launch.subprocess, "Popen", Started)
    monkeypatch.setattr(launch, "port_free", lambda h, p: True)
    assert launch.launch(ws.root, port=8599, host=host) == 0
    out, err = capsys.readouterr()
    return out + err, started[0]


def test_loopback_launch_prints_no_warning(monkeypatch, capsys, tmp_path):
    for host in (LOOPBACK, "localhost", "::1"):
        text, cmd = _launch_output(monkeypatch, capsys, tmp_path, host)
        assert "warning" not in text.lower() and f"--server.address={host}" in cmd


def test_binding_beyond_loopback_warns(monkeypatch, capsys, tmp_path):
    text, cmd = _launch_output(monkeypatch, capsys, tmp_path, "0.0.0.0")
    assert "--server.address=0.0.0.0" in cmd
    assert "warning" in text.lower() and "0.0.0.0" in text


def test_readme_documents_binding_and_sign_in():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Reliability and security"):]
    assert "--host 0.0.0.0" in section and "warning" in section.lower()
    assert "st.login" in section and "[auth]" in section and "secrets.toml" in section


def test_sign_in_secrets_are_never_committed():
    ignored = subprocess.run(["git", "check-ignore", "-q", ".streamlit/secrets.toml"], cwd=ROOT)
    assert ignored.returncode == 0, ".streamlit/secrets.toml (client secret, cookie secret) must be git-ignored"


# ---------------------------------------------------------------------------- paths stored in the database
@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> Workspace:
    return small_audited_workspace(tmp_path_factory.mktemp("exposure"), prompts=3)[0]


@pytest.fixture
def private(audited, tmp_path) -> tuple[Workspace, Path]:
    """A copy of the workspace beside a private photograph outside it, and a symlink inside pointing at it."""
    import shutil

    shutil.copytree(audited.root, tmp_path / "ws")
    secret = tmp_path / "private" / "secret.png"
    secret.parent.mkdir()
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(secret)
    (tmp_path / "ws" / "generations" / "innocent.png").symlink_to(secret)
    return Workspace.open(tmp_path / "ws"), secret


def tampered_paths(secret: Path) -> list[str]:
    return ["../../etc/passwd", "/etc/passwd", "../private/secret.png", str(secret), "generations/innocent.png",
            "generations/../../private/secret.png", "training/../../private/secret.png", "./../private/secret.png"]


def test_image_helpers_of_the_pages_refuse_paths_leading_outside(private):
    from dashboard import ui

    ws, secret = private
    with ws.connect() as con:
        inside = con.execute("SELECT path FROM training_images LIMIT 1").fetchone()[0]
    assert views.display_image(ws, inside).shape[2] == 3  # what a page shows, from inside
    for rel in tampered_paths(secret):
        for read in (lambda: views.display_image(ws, rel), lambda: views.file_data_uri(ws, rel),
                     lambda: views.pair_arrays(ws, rel, inside), lambda: views.pair_arrays(ws, inside, rel),
                     lambda: ui.image(str(ws.root), rel, 64), lambda: ui.pair(str(ws.root), rel, inside)):
            with pytest.raises(WorkspaceError, match="outside the workspace"):
                read()


def tamper(ws: Workspace, rel: str) -> int:
    """Point the first candidate's medoid generation at ``rel`` (as a damaged or hostile database would)."""
    with ws.connect() as con:
        cand, gen = con.execute("SELECT id, medoid_generation_id FROM candidates ORDER BY score, id LIMIT 1").fetchone()
        con.execute("UPDATE generations SET path = ? WHERE id = ?", (rel, gen))
    return cand


def test_reports_backups_and_verify_never_read_a_tampered_path(private, tmp_path, capsys):
    import base64

    from core.cli import main
    from core.report import build_report

    ws, secret = private
    secret_pixels = base64.b64encode(images.png_bytes(np.asarray(Image.open(secret)))).decode()[:200]
    for rel in tampered_paths(secret):
        tamper(ws, rel)
        try:
            html = build_report(ws)
        except MemauditError as e:
            assert "outside the workspace" in str(e)
        else:
            assert secret_pixels not in html
        out = tmp_path / f"backup-{abs(hash(rel))}"
        assert main(["backup", str(ws.root), str(out)]) == 1
        assert "outside the workspace" in capsys.readouterr().err
        assert not [p for p in out.rglob("*") if p.is_file() and p.read_bytes() == secret.read_bytes()]
        try:
            code = main(["verify", str(ws.root)])
        except SystemExit as e:
            code = e.code
        assert code == 1 and f"missing: {rel}" in capsys.readouterr().out


def test_the_review_page_does_not_show_a_tampered_path(private):
    from streamlit.testing.v1 import AppTest

    from dashboard import ui

    ws, secret = private
    tamper(ws, str(secret))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60)
    at.session_state[ui.WS_KEY] = str(ws.root)
    at.session_state["reviewer"] = "mallory"
    at.switch_page("app_pages/review.py")
    at.run()
    assert [t.value for t in at.title][:1] == ["Review"]
    said = [str(e.value) for e in at.exception] + [str(e.value) for e in at.warning] + [str(e.value) for e in at.error]
    assert any("outside the workspace" in s for s in said), said


def test_pages_get_images_only_through_core_views():
    """No dashboard file opens a file itself or hands Streamlit a path: images arrive as arrays made by
    core.views, which resolves every stored path inside the workspace."""
    readers = {"open", "load_image", "load_working", "read_bytes", "read_text"}
    for path in sorted((ROOT / "dashboard").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            if name in readers and owner not in ("Workspace",):
                pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno} reads a file itself ({owner + '.' if owner else ''}{name})")
            if name == "image" and owner == "st" and node.args:
                first = node.args[0]
                assert not isinstance(first, (ast.Constant, ast.JoinedStr)), f"{path}:{node.lineno}: st.image of a path"
                assert "path" not in ast.unparse(first).lower(), f"{path}:{node.lineno}: st.image of a path"


# ---------------------------------------------------------------------------- a live server
def other_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses (none on an isolated machine)."""
    found = set()
    try:
        found.update(subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split())
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        found.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return sorted(a for a in found if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", a) and not a.startswith("127."))


@pytest.fixture(scope="module")
def server(audited, tmp_path_factory):
    """``memaudit dashboard WS`` as the launcher starts it, with every default."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("exposure-server") / "streamlit.log"
    with running_dashboard(audited.root, port, log_path, cwd=tmp_path_factory.getbasetemp(), env=ENV):
        yield port, audited


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (no client-side normalisation of '..')."""
    con = http.client.HTTPConnection(LOOPBACK, port, timeout=20)
    try:
        con.putrequest("GET", path, skip_accept_encoding=True)
        con.endheaders()
        response = con.getresponse()
        return response.status, response.read()
    finally:
        con.close()


def test_the_server_listens_on_loopback_only(server):
    port, _ = server
    addresses = other_addresses()
    if not addresses:
        pytest.skip("this machine has no non-loopback address to try")
    for address in addresses:
        with socket.socket() as s:
            s.settimeout(3)
            assert s.connect_ex((address, port)) != 0, f"the dashboard answers on {address}:{port}"


def test_state_changing_requests_need_the_xsrf_token(server):
    port, _ = server
    con = http.client.HTTPConnection(LOOPBACK, port, timeout=20)
    try:
        con.request("PUT", "/_stcore/upload_file/some-session/some-file", body=b"x" * 10,
                    headers={"Content-Type": "application/octet-stream"})
        assert con.getresponse().status == 403
    finally:
        con.close()


def test_no_url_reads_a_file_of_the_workspace_or_the_machine(server):
    port, ws = server
    with ws.connect() as con:
        training = con.execute("SELECT path FROM training_images LIMIT 1").fetchone()[0]
        generation = con.execute("SELECT path FROM generations LIMIT 1").fetchone()[0]
    forbidden = [b"root:x:0:0", b"SQLite format 3", (ws.root / training).read_bytes(), (ws.root / generation).read_bytes()]
    name = Path(training).name
    paths = ["/../../../../etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/app/static/../../../../etc/passwd",
             "/app/static/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/media/../../../../etc/passwd",
             "/media/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/component/..%2f..%2f..%2f..%2fetc%2fpasswd",
             "/_stcore/../../../../etc/passwd", "/static/../../../../etc/passwd", "//etc/passwd",
             "/audit.db", f"/{ws.root.name}/audit.db", f"{ws.root}/audit.db", f"/{training}", f"/app/static/{training}",
             f"/media/{name}", f"/static/{training}", f"/{generation}", f"/app/static/{generation}",
             f"/component/{ws.root}/{training}", f"/{ws.root}/{training}"]
    for path in paths:
        status, body = raw_get(port, path)
        for secret in forbidden:
            assert secret not in body, f"GET {path} ({status}) returned a file's content"


def test_sign_in_gate_stops_every_page_until_sign_in(tmp_path):
    """No secrets: the app runs as the single-user tool. An [auth] section: every page shows only
    a Sign in button until the visitor has signed in."""
    from streamlit.testing.v1 import AppTest

    from dashboard import ui

    ws = Workspace.init(tmp_path / "ws")
    app = str(ROOT / "dashboard" / "app.py")
    for page in (None, "app_pages/review.py", "app_pages/export.py"):
        at = AppTest.from_file(app, default_timeout=60)
        at.session_state[ui.WS_KEY] = str(ws.root)
        if page:
            at.switch_page(page)
        at.run()
        assert not at.exception and "Sign in" not in [b.label for b in at.button]
        at = AppTest.from_file(app, default_timeout=60)
        at.session_state[ui.WS_KEY] = str(ws.root)
        at.secrets["auth"] = {"redirect_uri": "http://127.0.0.1:8501/oauth2callback", "cookie_secret": "x" * 32,
                              "client_id": "id", "client_secret": "secret",
                              "server_metadata_url": "https://issuer.example/.well-known/openid-configuration"}
        if page:
            at.switch_page(page)
        at.run()
        assert not at.exception and [b.label for b in at.button] == ["Sign in"]
        assert not at.text_input and not at.dataframe



BROKEN_SECRETS = {"not-toml": b'[auth]\nredirect_uri = "http://127.0.0.1:8501/oauth2callback"\ncookie_secret = "unterminated\n',
                  "not-utf8": b'[auth]\nclient_secret = "caf\xe9"\n'}


def _site_with_secrets(tmp_path: Path, content: bytes) -> tuple[Path, Path, dict[str, str]]:
    """(folder to start in, its .streamlit/secrets.toml, environment with a HOME of no secrets)."""
    site = tmp_path / "site"
    (site / ".streamlit").mkdir(parents=True)
    secrets = site / ".streamlit" / "secrets.toml"
    secrets.write_bytes(content)
    home = tmp_path / "home"  # no ~/.streamlit/secrets.toml of the machine's user
    home.mkdir()
    return site, secrets, dict(ENV, HOME=str(home), PYTHONPATH=str(ROOT))


@pytest.mark.parametrize("kind", sorted(BROKEN_SECRETS))
def test_memaudit_dashboard_refuses_to_start_beside_a_secrets_file_that_cannot_be_read(tmp_path, kind, monkeypatch):
    ws = Workspace.init(tmp_path / "ws")
    site, secrets, env = _site_with_secrets(tmp_path, BROKEN_SECRETS[kind])
    out = subprocess.run([sys.executable, "-m", "core.cli", "dashboard", str(ws.root), "--port", str(free_port())],
                         cwd=site, env=env, capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert f"{secrets}: the secrets file cannot be read (" in lines[0] and "Traceback" not in out.stderr
    monkeypatch.chdir(site)
    monkeypatch.setenv("HOME", env["HOME"])
    with pytest.raises(InputError, match="the secrets file cannot be read"):
        launch.check_secrets()
    secrets.write_bytes(b"")  # an empty secrets file is a valid one (no [auth]: no sign-in)
    launch.check_secrets()


@pytest.mark.browser
def test_a_secrets_file_that_cannot_be_read_stops_every_page_instead_of_dropping_sign_in(tmp_path):
    """`streamlit run` beside a .streamlit/secrets.toml that is not TOML (the launcher's own command
    line, without its check): every page shows one message naming the file, in a real browser, and
    nothing of the workspace; it does not fall back to serving without sign-in."""
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    ws = Workspace.init(tmp_path / "ws")
    site, secrets, env = _site_with_secrets(tmp_path, BROKEN_SECRETS["not-toml"])
    with running_dashboard(ws.root, free_port(), tmp_path / "server.log", cwd=site, env=env) as base, \
            sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            for path in ("", "/review"):
                page = browser.new_page()
                page.goto(base + path)
                alert = page.get_by_text("cannot be read, so whether this dashboard needs sign-in is unknown")
                alert.wait_for(timeout=60_000)
                assert str(secrets) in alert.inner_text()
                assert page.get_by_role("heading", name="Overview").count() == 0 and page.get_by_text("Sign in").count() == 0
                if not path:
                    page.screenshot(path=str(tmp_path / "broken-secrets.png"))
                page.close()
        finally:
            browser.close()
