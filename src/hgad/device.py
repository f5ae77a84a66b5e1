"""Which torch device a command runs on (kept apart from training, so loading a detector stays light)."""

from __future__ import annotations

import os

import torch

from hgad.errors import ConfigError

__all__ = ["resolve_device", "cuda_device", "env_world_size", "env_int"]


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu`` or ``cuda``; CUDA is ``cuda:LOCAL_RANK`` under a multi-process torchrun."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "cuda requested but no CUDA device is available")
    return cuda_device() if name == "cuda" else torch.device(name)


def env_int(name: str, default: int | None = None) -> int:
    """An integer environment variable set by torchrun (``default`` when it is absent)."""
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise ConfigError(name, "environment variable missing: WORLD_SIZE is set, so hgad expects to be "
                                    "launched by torchrun, which sets RANK, LOCAL_RANK, MASTER_ADDR and "
                                    "MASTER_PORT")
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(name, f"environment variable is not an integer: {text!r}") from None


def env_world_size() -> int:
    """Number of processes ``torchrun`` started (1 without torchrun)."""
    return env_int("WORLD_SIZE", 1)


def cuda_device() -> torch.device:
    """``cuda:LOCAL_RANK`` under a multi-process ``torchrun``, else the current CUDA device."""
    if env_world_size() <= 1:
        return torch.device("cuda")
    local = env_int("LOCAL_RANK")
    count = torch.cuda.device_count()
    if not 0 <= local < count:
        raise ConfigError("--nproc-per-node", f"process with LOCAL_RANK {local} has no GPU: {count} visible "
                                              "(start at most one process per GPU)")
    return torch.device("cuda", local)
