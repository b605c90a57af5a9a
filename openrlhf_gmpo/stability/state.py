"""Determinism and checkpoints: derived seeds, RNG states, atomic saves.

A resumed CPU run must reproduce an uninterrupted one bit for bit, so every random draw in the loop comes from a seed
derived from (seed, purpose, algorithm, step) rather than from whatever state the process happens to be in, and the
RNG states are saved anyway for anything that still reads the global generators.
"""

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (Python's hash() is salted per process, so it cannot be used)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def set_determinism(threads: int, device: str) -> None:
    """Fixed thread count (reduction order depends on it); on CPU also deterministic kernels where PyTorch has them.

    On CUDA exact reproducibility would cost speed (and a cuBLAS workspace setting), which the 200m budget cannot spare.
    """
    torch.set_num_threads(threads)
    if device == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same directory, then os.replace: a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: Path, mmap: bool = False) -> Any:
    # our own files only; they hold numpy RNG state and plain dicts, which the weights-only unpickler rejects
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def config_fingerprint(*parts: Any) -> str:
    """Short hash of configuration dicts, so a cache or checkpoint made under other settings is never reused."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]
