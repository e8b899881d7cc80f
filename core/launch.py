"""Start the dashboard: ``streamlit run <installed dashboard/app.py> -- WS`` with memaudit's server settings.

The app is started by its file path in a new process, so the engine never imports the front end
(``dashboard`` imports ``core``, never the other way).

The same settings live in ``.streamlit/config.toml`` for ``streamlit run dashboard/app.py -- WS``
from a checkout; here they are passed as flags so that the dashboard behaves the same when it
is started from any folder (Streamlit only reads ``.streamlit/config.toml`` from the current one).

Streamlit always runs headless: without ``server.headless`` it asks for an email address on
the first run of a machine (no ``~/.streamlit/credentials.toml``) and, with no terminal to
answer, exits with status 255. ``launch(..., open_browser=True)`` opens the browser itself,
with the ``webbrowser`` module, once the server's health check answers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import webbrowser
from pathlib import Path
from typing import Callable, Sequence

from .config import DASHBOARD_PORT
from .errors import InputError
from .store import Workspace

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"  # installed beside core (pyproject: packages)

# Flattened ``section.option`` -> value; equal to .streamlit/config.toml (a test checks it).
CONFIG: dict[str, str | int | bool | list[str]] = {
    "server.address": "127.0.0.1",
    "server.port": DASHBOARD_PORT,
    "server.headless": True,
    "server.enableXsrfProtection": True,
    "server.runOnSave": False,
    "browser.gatherUsageStats": False,
    "client.toolbarMode": "minimal",
    "client.showErrorDetails": "full",
    "theme.base": "light",
    "theme.primaryColor": "#3b5b7a",
    "theme.backgroundColor": "#fbfbfa",
    "theme.secondaryBackgroundColor": "#f0f1f2",
    "theme.textColor": "#1f2328",
    "theme.borderColor": "#d9dcdf",
    "theme.showWidgetBorder": True,
    "theme.baseRadius": "small",
    "theme.baseFontSize": 14,
    "theme.headingFontSizes": ["1.75rem", "1.35rem", "1.1rem"],
    "theme.paddingTop": "1.5rem",
    "theme.metricValueFontSize": "1.6rem",
}


def _flag_value(value: str | int | bool | list[str]) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return json.dumps(value)  # Streamlit parses list options given on the command line as JSON
    return str(value)


def command(ws: str | Path, port: int = DASHBOARD_PORT, host: str = "127.0.0.1", extra_args: Sequence[str] = ()) -> list[str]:
    """The ``streamlit run`` command line for workspace ``ws`` (an absolute path is passed on); always headless."""
    options = dict(CONFIG, **{"server.port": int(port), "server.address": host})
    flags = [f"--{name}={_flag_value(value)}" for name, value in options.items()]
    return [sys.executable, "-m", "streamlit", "run", str(APP), *flags, *extra_args, "--", str(Path(ws).resolve())]


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
HEALTH_TIMEOUT_S = 120.0


def url_for(host: str, port: int) -> str:
    return f"http://{host if ':' not in host else f'[{host}]'}:{port}"


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = HEALTH_TIMEOUT_S) -> bool:
    """Poll ``url``/_stcore/health until it answers ok (True), or the server exits or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read() == b"ok":
                    return True
        except OSError:
            pass
        time.sleep(0.25)
    return False


def open_in_browser(url: str) -> bool:
    """Open ``url`` with the ``webbrowser`` module; False when there is nothing to open it with.

    On Linux with no display (no DISPLAY or WAYLAND_DISPLAY) and no $BROWSER, nothing is tried:
    ``webbrowser`` would otherwise fall back to a text-mode browser that takes over the terminal.
    """
    if (sys.platform.startswith("linux") and not any(os.environ.get(v) for v in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER"))):
        return False
    try:
        return bool(webbrowser.open_new_tab(url))
    except webbrowser.Error:
        return False


def secrets_files() -> list[Path]:
    """The secrets files Streamlit reads by default: the user's, then the current folder's."""
    return [Path.home() / ".streamlit" / "secrets.toml", Path.cwd() / ".streamlit" / "secrets.toml"]


def check_secrets() -> None:
    """InputError when a secrets file exists but cannot be read as TOML.

    Its [auth] section decides whether the dashboard asks for sign-in; a file Streamlit cannot read
    must stop the start, never serve a shared dashboard without sign-in (the pages stop too).
    """
    import tomllib

    for path in secrets_files():
        if not path.exists():
            continue
        try:
            tomllib.loads(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(f"{path}: the secrets file cannot be read ({reason}); fix or remove it: it says whether "
                             "the dashboard asks for sign-in") from None


def launch(ws: str | Path, port: int = DASHBOARD_PORT, host: str = "127.0.0.1", extra_args: Sequence[str] = (),
           *, open_browser: bool = False, opener: Callable[[str], bool] = open_in_browser) -> int:
    """Serve the dashboard for ``ws`` until interrupted; returns Streamlit's exit status.

    With ``open_browser``, ``opener(url)`` is called once the server answers its health check
    (a server that never answers is left running, and its URL printed, without opening anything).
    Raises WorkspaceError when ``ws`` is not a workspace and InputError when the port is taken or a
    secrets file cannot be read, before anything is started.
    """
    Workspace.open(ws)
    check_secrets()
    if not 0 < int(port) < 65536:
        raise InputError(f"port {port} is not a TCP port; pass --port between 1 and 65535")
    if not port_free(host, int(port)):
        raise InputError(f"port {port} on {host} is already in use; pass another with --port N")
    if host not in LOOPBACK_HOSTS:
        print(f"memaudit: warning: serving on {host}, beyond this machine: everyone who can reach it sees the "
              "training set, the generations and the labels; use it only behind HTTPS and sign-in (README, "
              "'Reliability and security')", file=sys.stderr, flush=True)
    url = url_for(host, int(port))
    print(f"memaudit dashboard: {url}  (Ctrl+C to stop)", flush=True)
    # stdin is not passed on: the server never reads it, and a terminal it could prompt on is not its to take
    proc = subprocess.Popen(command(ws, port, host, extra_args), stdin=subprocess.DEVNULL)
    previous = None
    if threading.current_thread() is threading.main_thread():
        # a SIGTERM to the launcher stops the server too, instead of leaving it running alone
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if open_browser and wait_healthy(url, proc) and not opener(url):
            print(f"memaudit: no browser to open here; open {url} yourself", file=sys.stderr, flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
