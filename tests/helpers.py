"""Small pieces several test modules share: the tiny model and launching two gloo ranks."""

import os
import socket
import subprocess

import torch

from rftlib.models import load_clip


def tiny_clip(seed: int = 0):
    """``rft-tiny`` with random weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return load_clip("rft-tiny", None)


def python_path(root) -> str:
    """``PYTHONPATH`` for a subprocess: the repository first, then whatever the caller had (a GPU
    machine may hold extra packages there)."""
    return os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_ranks(command: list, env: dict, cwd, tries: int = 2) -> bool:
    """Run ``command`` as two gloo ranks; retry once on a fresh port if the rendezvous fails.

    On a shared machine another job can grab the "free" port between probing and binding.
    """
    for _ in range(tries):
        port = str(free_port())
        procs = [subprocess.Popen(command, cwd=cwd, env={**env, "WORLD_SIZE": "2", "RANK": str(r),
                                                         "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                                                         "MASTER_PORT": port}) for r in range(2)]
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=300))
            except subprocess.TimeoutExpired:  # its peer died: the rendezvous will never complete
                proc.kill()
                codes.append(proc.wait())
        if codes == [0, 0]:
            return True
    return False


def run_single_and_two_ranks(script_text: str, tmp_path, *args: str) -> tuple[dict, dict]:
    """Run a training script once in one process and once as two gloo ranks; return both state dicts.

    The script gets the output ``.safetensors`` path as its first argument, then ``args``; it runs
    from the repository root with the repository on ``PYTHONPATH``.
    """
    import os
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    script = Path(tmp_path) / "ddp_fit.py"
    script.write_text(script_text)
    env = {**os.environ, "PYTHONPATH": python_path(root)}
    single, ddp = Path(tmp_path) / "single.safetensors", Path(tmp_path) / "ddp.safetensors"
    subprocess.run([sys.executable, str(script), str(single), *args], env=env, cwd=root, check=True, timeout=300)
    assert launch_two_ranks([sys.executable, str(script), str(ddp), *args], env, root), "the two-rank run failed"
    return load_file(str(single)), load_file(str(ddp))
