"""Devices: turn a user's device string into a ``torch.device`` that exists here, or say why not.

One rule for the CLI, :func:`rftlib.methods.run_method` and the notebooks: ``auto`` means CUDA when
available, else CPU; ``cuda``/``cuda:N`` need a CUDA GPU (and that index); ``mps`` needs Apple's
backend. A missing GPU is reported as such, before any data or weights are loaded, instead of
surfacing later as an unrelated error (a failed weights download, a CUDA driver message).
"""

from __future__ import annotations

import torch

SUPPORTED = ("auto", "cpu", "cuda", "cuda:N", "mps")


def resolve_device(device: str | torch.device) -> torch.device:
    """The ``torch.device`` for ``device``, checked against this machine.

    Raises:
        ValueError: naming the device and what this machine offers.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a device; use one of {', '.join(SUPPORTED)}") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but this machine has no CUDA GPU (torch "
                             f"{torch.__version__}); use device 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device={str(device)!r} but Apple's MPS backend is not available here; use 'cpu'")
    elif dev.type != "cpu":
        raise ValueError(f"device={str(device)!r} is not supported; use one of {', '.join(SUPPORTED)}")
    return dev
