"""Checkpoints of a training run: every RNG state, and files written atomically (a temporary file, then
``os.replace``), so an interrupted run loses at most the epoch in progress."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from .config import UsageError

__all__ = ["load_checkpoint", "rng_states", "save_atomic", "set_rng_states"]


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_atomic(obj: object, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace (no half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by ``train`` (our own file: it holds Python RNG state, so not weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UsageError(f"cannot read checkpoint {path}: {err}") from err
