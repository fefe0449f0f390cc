"""Suite-wide settings for everything pytest collects (tests/ and the notebooks run by nbval).

Offline and quiet, and run outputs (checkpoints, the results store) always go to a temporary
folder, never to ./rft_runs next to the notebooks or to a store the user's environment names;
caches (the synthwild world, decoded evaluation splits of the fabricated datasets) go to another
instead of ~/.cache/rftlib unless ``$RFT_CACHE_DIR`` says where.
"""

import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RFT_PROGRESS", "off")

_TEMPORARY: dict[str, str] = {}
_SAVED: dict[str, str | None] = {}


def pytest_configure(config):
    runs = _TEMPORARY["RFT_RUNS_DIR"] = tempfile.mkdtemp(prefix="rft-test-runs-")
    forced = {"RFT_RUNS_DIR": runs, "RFT_RESULTS_DB": os.path.join(runs, "results.db")}
    if not os.environ.get("RFT_CACHE_DIR"):
        forced["RFT_CACHE_DIR"] = _TEMPORARY["RFT_CACHE_DIR"] = tempfile.mkdtemp(prefix="rft-test-cache-")
    for name, value in forced.items():
        _SAVED[name] = os.environ.get(name)
        os.environ[name] = value
    _unbounded_iopub_queue()


def pytest_unconfigure(config):
    for folder in _TEMPORARY.values():
        shutil.rmtree(folder, ignore_errors=True)
    for name, value in _SAVED.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# -- nbval (the suite's one execution of every notebook) must not lose a cell's last messages.
# nbval reads a cell's IOPub messages only after its execute_reply; a training cell's live plot and
# progress widgets queue ~2,000 messages (~18 MB for croft.ipynb) meanwhile, ZeroMQ's PUB socket
# drops what exceeds its high-water mark (1,000 per side), the final "idle" status can be among them,
# and nbval fails the cell with "Timeout of 5 seconds exceeded waiting for output" (reproduced with
# 4,000 large display messages; papermill/nbclient read IOPub while waiting and are unaffected).
# An unbounded client-side IOPub queue keeps the kernel's queue drained. (LiveTrainingPlot redraws
# at most once a second, which keeps the count low too; this makes the suite independent of timing.)
def _unbounded_iopub_queue() -> None:
    try:
        import zmq
        from jupyter_client.connect import ConnectionFileMixin
    except ImportError:  # no notebook extras: nbval does not run either
        return
    connect_iopub = ConnectionFileMixin.connect_iopub
    if getattr(connect_iopub, "_rft_unbounded", False):
        return

    def connect_unbounded(self, identity=None):
        defaults = self.context.sockopts  # options given to the sockets this context creates
        previous = defaults.get(zmq.RCVHWM)
        defaults[zmq.RCVHWM] = 0
        try:
            return connect_iopub(self, identity)
        finally:
            if previous is None:
                defaults.pop(zmq.RCVHWM, None)
            else:
                defaults[zmq.RCVHWM] = previous

    connect_unbounded._rft_unbounded = True
    ConnectionFileMixin.connect_iopub = connect_unbounded


