"""Fixtures for the real-browser tests: Debian chromium driven by Playwright, and a throw-away
JupyterLab server on loopback.

Nothing is installed here (``tests/browser/ensure_chromium.sh``, run by the README's test command,
does that). Without chromium or playwright the tests skip with a one-line reason, except under
``CI=true``, where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("RFT_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "browser"
SERVER_START_TIMEOUT_S = 90


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"browser tests must run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's chromium (``$RFT_CHROMIUM`` overrides); skip (fail under CI) when absent."""
    path = os.environ.get("RFT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        _unavailable("chromium not found (bash tests/browser/ensure_chromium.sh installs it)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    return path


def processes_mentioning(text: str) -> list[str]:
    """Command lines (first 200 chars) of live processes whose arguments contain ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args[:200])
    return found


@dataclass
class LabServer:
    url: str
    root: Path
    process: subprocess.Popen


def _wait_ready(server: LabServer, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {server.process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/api/status", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise RuntimeError(f"jupyter lab did not answer within {SERVER_START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server (it shuts its kernels down), then make sure its whole process group is gone."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # stray kernels, if any
    except ProcessLookupError:
        pass


def _lab_environment(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTER_DATA_DIR", "data"), ("IPYTHONDIR", "ipython")):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(tmp / sub)
    # the "get notified about Jupyter news?" toast covers the plot in screenshots
    labconfig = tmp / "config" / "labconfig"
    labconfig.mkdir(exist_ok=True)
    (labconfig / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    env.update(HF_HUB_OFFLINE="1", RFT_PROGRESS="off", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="session")
def lab_server(tmp_path_factory, chromium_path) -> LabServer:
    """A JupyterLab on 127.0.0.1 with fresh config/runtime/data dirs, serving an empty folder."""
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "notebooks"
    root.mkdir()
    port = free_port()
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--ServerApp.root_dir={root}", "--IdentityProvider.token=", "--ServerApp.password=",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly", "--ServerApp.port_retries=0"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = tmp / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, env=_lab_environment(tmp), stdout=out, stderr=subprocess.STDOUT,
                                   cwd=root, start_new_session=True)
    server = LabServer(f"http://127.0.0.1:{port}", root, process)
    try:
        _wait_ready(server, log)
        yield server
    finally:
        _stop(process)
        assert process.poll() is not None, "jupyter lab is still running"
        time.sleep(0.5)
        # kernels carry their connection file (in the runtime dir under tmp) on the command line
        assert not processes_mentioning(str(tmp)), f"left behind: {processes_mentioning(str(tmp))}"
