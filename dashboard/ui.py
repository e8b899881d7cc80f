"""What every page shares: the open workspace, the chosen audit run, cached reads, image rendering.

Pages call ``workspace()`` and ``run_id(ws)``: each says in one sentence what is missing and
stops the page when its input is absent. Caches: ``st.cache_resource`` for shared thread-safe
objects (the run cache of distance matrices, the background-job registry), ``st.cache_data``
for serialisable results keyed by what they depend on (immutable run results, image files
whose names carry their content hash).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import streamlit as st

from core import config, rethreshold, views
from core import runs as audit_runs
from core.errors import MemauditError
from core.images import to_uint8
from core.store import Workspace

from .jobs import JobRegistry

WS_KEY = "memaudit_workspace"
RUN_KEY = "memaudit_run"
ENV_WS = "MEMAUDIT_WORKSPACE"


# ---------------------------------------------------------------------------- pages
def pages() -> list[st.Page]:
    """The dashboard's pages (paths relative to app.py)."""
    return [
        st.Page("app_pages/overview.py", title="Overview", icon=":material/dashboard:", default=True),
        st.Page("app_pages/triage.py", title="Triage", icon=":material/filter_list:"),
        st.Page("app_pages/generate.py", title="Generate", icon=":material/auto_awesome:"),
        st.Page("app_pages/cliques.py", title="Cliques", icon=":material/hub:"),
        st.Page("app_pages/review.py", title="Review", icon=":material/rate_review:"),
        st.Page("app_pages/calibrate.py", title="Calibrate", icon=":material/tune:"),
        st.Page("app_pages/training.py", title="Training data", icon=":material/photo_library:"),
        st.Page("app_pages/inpainting.py", title="Inpainting", icon=":material/format_paint:"),
        st.Page("app_pages/membership.py", title="Membership", icon=":material/how_to_reg:"),
        st.Page("app_pages/export.py", title="Export", icon=":material/download:"),
    ]


# ---------------------------------------------------------------------------- workspace and run
def set_workspace_from_args(args: Sequence[str]) -> None:
    """Remember ``streamlit run app.py -- WS`` (or $MEMAUDIT_WORKSPACE) for this session, once."""
    if WS_KEY not in st.session_state:
        st.session_state[WS_KEY] = (args[0] if args else None) or os.environ.get(ENV_WS) or None


@st.cache_resource(show_spinner=False)
def _open(path: str) -> Workspace:
    return Workspace.open(path)


def try_workspace() -> Workspace | None:
    path = st.session_state.get(WS_KEY)
    if not path:
        return None
    try:
        return _open(str(path))
    except MemauditError:
        return None


def workspace() -> Workspace:
    """The session's workspace, or a one-sentence message and a stopped page."""
    path = st.session_state.get(WS_KEY)
    if not path:
        st.info("No workspace is open: start the dashboard with `memaudit dashboard WS`.")
        st.stop()
    try:
        return _open(str(path))
    except MemauditError as e:
        st.error(str(e))
        st.stop()
    raise AssertionError("unreachable")


def runs(ws: Workspace) -> list[audit_runs.RunInfo]:
    return audit_runs.list_runs(ws)


def run_id(ws: Workspace) -> int:
    """The audit run chosen in the sidebar (default: the latest), or a message and a stopped page."""
    known = [r.id for r in runs(ws)]
    if not known:
        st.info("This workspace has no audit run yet: run one from the Overview page or with `memaudit audit WS`.")
        st.stop()
    chosen = st.session_state.get(RUN_KEY)
    return chosen if chosen in known else known[-1]


def run_selector(ws: Workspace) -> None:
    """Sidebar choice of audit run; the pages read it through ``run_id``."""
    infos = runs(ws)
    if not infos:
        return
    ids = [r.id for r in infos][::-1]
    by_id = {r.id: r for r in infos}
    if st.session_state.get(RUN_KEY) not in ids:
        st.session_state[RUN_KEY] = ids[0]
    st.sidebar.selectbox(
        "Audit run", ids, key=RUN_KEY,
        format_func=lambda i: f"run {i} · tau {by_id[i].params.edge_threshold:g} · k {by_id[i].params.min_clique} · "
                              f"delta {by_id[i].params.delta:g}")


# ---------------------------------------------------------------------------- cached reads
@st.cache_resource(show_spinner=False, max_entries=4)
def run_cache(root: str, run: int) -> rethreshold.RunCache:
    """The run's cached distance matrices and neighbours (read-only numpy arrays: safe to share)."""
    return rethreshold.RunCache(Workspace(root), run)


@st.cache_resource(show_spinner=False)
def jobs() -> JobRegistry:
    return JobRegistry()


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "estimating…"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h {seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m {seconds % 60:02d}s"


def time_left(eta: float | None) -> str:
    """'about 1m 05s left', or 'estimating the time left' before a rate is known."""
    return "estimating the time left" if eta is None else f"about {duration(eta)} left"


def job_panel(key: tuple[str, str], *, name: str, unit: str, cancel_help: str, stopping: str,
              done: Callable[[Any], str], cancelled: Callable[[Any], str]) -> None:
    """The panel of one background job of the registry: while it runs, progress (done of total ``unit``,
    time elapsed and left) and a Cancel button, refreshed every second; then its outcome (``done(result)``,
    ``cancelled(status)`` or the error with its traceback) and a Dismiss button. ``name`` prefixes the
    widget keys; when the job ends the page reruns, so the page's own form and lists see its result."""
    registry = jobs()
    job = registry.get(key)

    @st.fragment(run_every=1.0 if job is not None and job.status().running else None)
    def panel() -> None:
        job = registry.get(key)
        if job is None:
            return
        s = job.status()
        flag = f"{name}_was_running"
        if s.running:
            st.session_state[flag] = True
            st.progress(s.fraction, text=f"{s.done} of {s.total or '?'} {unit} · {duration(s.elapsed)} elapsed · "
                                         f"{time_left(s.eta)}" + (f" · {stopping}" if s.state == "stopping" else ""))
            st.button("Cancel", on_click=job.cancel, disabled=s.state == "stopping", key=f"{name}_cancel", help=cancel_help)
            return
        if st.session_state.pop(flag, False):
            st.rerun()  # the whole page again: its form is enabled and its lists show the new result
        if s.state == "done":
            st.success(done(s.result))
        elif s.state == "cancelled":
            st.warning(cancelled(s))
        else:
            st.error(s.error or f"{name} failed")
            if s.traceback:
                with st.expander("Details"):
                    st.code(s.traceback)
        st.button("Dismiss", on_click=registry.forget, args=(key,), key=f"{name}_dismiss")

    panel()


@st.cache_data(show_spinner=False, max_entries=2000)
def image(root: str, relpath: str, min_side: int) -> np.ndarray:
    """A workspace image enlarged with nearest neighbour to at least ``min_side`` (file names carry a content hash)."""
    return views.display_image(Workspace(root), relpath, min_side)


@st.cache_data(show_spinner=False, max_entries=500)
def pair(root: str, generation_path: str, training_path: str) -> tuple[np.ndarray, np.ndarray]:
    return views.pair_arrays(Workspace(root), generation_path, training_path)


def pair_or_warn(ws: Workspace, generation_path: str, training_path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The pair's pixels, or a one-sentence warning (and None) when a file cannot be read."""
    try:
        return pair(str(ws.root), generation_path, training_path)
    except MemauditError as e:
        st.warning(f"Cannot compare this pair: {e}")
        return None


# ---------------------------------------------------------------------------- rendering
def show_image(ws: Workspace, relpath: str, width: int, caption: str | None = None, *, fill: bool = False) -> None:
    """An image at ``width`` CSS pixels (or the column's width with ``fill``); tiny images are first
    enlarged by an integer factor with nearest neighbour, so their pixels stay visible squares."""
    try:
        arr = image(str(ws.root), relpath, width)
    except MemauditError as e:
        st.warning(str(e))
        return
    st.image(arr, width="stretch" if fill else width, caption=caption, output_format="PNG")  # lossless: copies are judged on pixels


@st.cache_data(show_spinner=False, max_entries=2000)
def _masked(root: str, image_path: str, mask_path: str, min_side: int) -> np.ndarray:
    return views.masked_input(Workspace(root), image_path, mask_path, min_side)


def show_masked_input(ws: Workspace, image_path: str, mask_path: str, width: int, caption: str | None = None) -> None:
    """An inpainting run's input (the original with the masked region grey) at ``width`` CSS pixels."""
    try:
        arr = _masked(str(ws.root), image_path, mask_path, width)
    except MemauditError as e:
        st.warning(str(e))
        return
    st.image(arr, width=width, caption=caption, output_format="PNG")


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if not np.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def blink_html(a: np.ndarray, b: np.ndarray, size: int, period: float = 1.2, labels: tuple[str, str] = ("generation", "training")) -> str:
    """Two images stacked, the top one blinking (CSS only, no script)."""
    ua = views.data_uri(views.upscale_nearest(to_uint8(a), size))
    ub = views.data_uri(views.upscale_nearest(to_uint8(b), size))
    return f"""
<style>
@keyframes memaudit-blink {{ 0%, 49.9% {{ opacity: 1; }} 50%, 100% {{ opacity: 0; }} }}
.memaudit-blink {{ position: relative; width: {size}px; height: {size}px; }}
.memaudit-blink img {{ position: absolute; inset: 0; width: {size}px; height: {size}px; image-rendering: pixelated; }}
.memaudit-blink .top {{ animation: memaudit-blink {period}s steps(1) infinite; }}
.memaudit-blink-legend {{ font-size: 12px; color: #6b7280; }}
</style>
<div class="memaudit-blink"><img src="{ub}" alt="{labels[1]}"><img class="top" src="{ua}" alt="{labels[0]}"></div>
<div class="memaudit-blink-legend">alternates {labels[0]} / {labels[1]} every {period / 2:g} s</div>
"""


JS_MAX_INT = 2**53 - 1  # the largest integer a browser's number input holds exactly


def number_setting(container: Any, label: str, name: str, value: Any, *, key: str, **kwargs: Any) -> Any:
    """``container.number_input`` for setting ``name``: its bounds and help from core.config (integer
    bounds capped at JS_MAX_INT, which the browser can hold)."""
    s = config.SETTINGS[name]
    lo, hi = s.minimum, s.maximum
    if s.type is int:
        lo = None if lo is None else int(max(lo, -JS_MAX_INT))
        hi = None if hi is None else int(min(hi, JS_MAX_INT))
        value = int(value)
    else:
        lo, hi, value = (None if lo is None else float(lo)), (None if hi is None else float(hi)), float(value)
    return container.number_input(label, lo, hi, value, key=key, help=s.help, **kwargs)


def error(e: BaseException) -> None:
    """A user error as one sentence; anything else with its traceback."""
    if isinstance(e, MemauditError):
        st.error(str(e))
    else:
        st.exception(e)


# ---------------------------------------------------------------------------- sign-in
def _secrets_files() -> list[str]:
    """The secrets files or folders Streamlit reads (option ``secrets.files``) that exist."""
    return [p for p in st.get_option("secrets.files") if os.path.exists(p)]


def sign_in_required() -> bool:
    """True when .streamlit/secrets.toml has an [auth] section (a shared deployment); False with no secrets file.

    A secrets file that exists but cannot be read (not TOML, not UTF-8, unreadable) stops every page
    with a message: serving without sign-in because of a typo would open a shared dashboard to all.
    """
    try:
        return "auth" in st.secrets
    except Exception as e:  # noqa: BLE001 - whatever went wrong, an unreadable file must not turn sign-in off
        present = _secrets_files()
        if not present and isinstance(e, FileNotFoundError):
            return False  # no secrets file: a single-user dashboard on loopback
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        st.error(f"The secrets file ({', '.join(present) or 'secrets.files'}) cannot be read, so whether this dashboard "
                 f"needs sign-in is unknown: {reason}. Fix or remove the file and restart the dashboard.")
        st.stop()
        raise  # st.stop raises; this line is never reached


def require_sign_in() -> None:
    """With [auth] configured, stop every page until the visitor has signed in (Streamlit's st.login)."""
    if sign_in_required() and not st.user.get("is_logged_in", False):
        st.title("memaudit")
        st.info("This dashboard is shared: sign in so that your labels carry your name.")
        st.button("Sign in", on_click=st.login, type="primary")
        st.stop()


def signed_in_reviewer() -> str | None:
    """The signed-in identity (e-mail, else name) when sign-in is on; None on a single-user dashboard."""
    if not sign_in_required() or not st.user.get("is_logged_in", False):
        return None
    return str(st.user.get("email") or st.user.get("name") or "").strip() or None
