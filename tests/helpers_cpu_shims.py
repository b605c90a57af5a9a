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


def emulate_cuda_tensors() -> None:
    """Let megatron's GPU-only optimizer path (DistributedOptimizer over DDP's buffers) run on CPU, in a spawned
    worker only: tensors asked for on "cuda" are made on the CPU, `Tensor.cuda()` returns the tensor itself, and
    `Tensor.type()` names the CUDA type, which megatron checks parameters against. Call `torch.cuda.is_available`
    -> True only around building the DDP wrapper and the optimizer, so that the package takes its GPU branches."""

    def on_host(device):
        if isinstance(device, int) or (isinstance(device, str | torch.device) and str(device).startswith("cuda")):
            return torch.device("cpu")
        return device

    for name in ("tensor", "zeros", "empty", "ones", "full", "arange", "zeros_like", "empty_like", "ones_like"):
        factory = getattr(torch, name)

        def made_on_host(*args, _factory=factory, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = on_host(kwargs["device"])
            return _factory(*args, **kwargs)

        setattr(torch, name, made_on_host)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.cuda.empty_cache = lambda: None
    host_type = torch.Tensor.type

    def cuda_type(self, *args, **kwargs):
        if args or kwargs:
            return host_type(self, *args, **kwargs)
        name = host_type(self)
        return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = cuda_type


@contextlib.contextmanager
def cuda_reported_available():
    """`torch.cuda.is_available()` is True inside (see emulate_cuda_tensors)."""
    available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        yield
    finally:
        torch.cuda.is_available = available
