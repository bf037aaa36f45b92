"""Every random generator a training step draws from, captured and restored per rank: torch's (CPU and
CUDA), Python's `random` and NumPy's global generator (timm's mixup and random erasing draw from the last
two). Stored as JSON-friendly values in each rank's checkpoint file; seeded from one seed per rank at the start
and on a resume across world sizes (`seed_generators`)."""

from __future__ import annotations

import ast
import base64
import io
import random
from typing import Any

import numpy as np
import torch


def _torch_state() -> str:
    buffer = io.BytesIO()
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def _restore_torch(text: str) -> None:
    state = torch.load(io.BytesIO(base64.b64decode(text)), weights_only=True)
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return {"torch": _torch_state(), "python": repr(random.getstate()), "numpy": numpy_state}


def restore_rng(state: dict[str, Any] | str) -> None:
    if isinstance(state, str):  # checkpoints written before Python's and NumPy's states were kept
        _restore_torch(state)
        return
    _restore_torch(state["torch"])
    random.setstate(ast.literal_eval(state["python"]))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": np.array(numpy_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(numpy_state)


def seed_generators(seed: int) -> None:
    """Every generator of `rng_state` from one 63-bit seed (seeds.stream_seed), CUDA's on every device included."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
