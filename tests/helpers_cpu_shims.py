"""Test-only shims that let megatron-core run on CPU with gloo process groups.

megatron-core assumes CUDA in a few places that do not matter for the maths (device lookups, side streams, a
device-to-host copy of the all-to-all split sizes). `install_cpu_shims()` replaces exactly those, as listed in
/work/shared/FACTS.md; package code never calls it. Its own module so that a Ray worker can install the shims at
start-up (stub_site/sitecustomize.py) without importing the rest of the test helpers.
"""

from __future__ import annotations

import contextlib

import torch


class _NoOpEvent:
    def synchronize(self):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass


class _NoOpStream:
    """Stands in for torch.cuda.Stream: CPU work is synchronous, so ordering between streams is already given."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return _NoOpEvent()

    def synchronize(self):
        pass


_SHARED_STREAM = _NoOpStream()


def install_cpu_shims() -> None:
    """Patch the CUDA-only calls megatron-core makes on its CPU path (idempotent, per process)."""
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = _NoOpEvent
    torch.cuda.current_stream = lambda *a, **k: _SHARED_STREAM
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None

    def move_to_cpu(tensor, as_numpy=False, record_stream=False):
        # The all-to-all needs the split sizes as host numbers; on CPU the tensor is already on the host.
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = move_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = move_to_cpu
