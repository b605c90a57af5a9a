"""Test-only shims that let megatron-core, and OpenRLHF's DeepSpeed policy actor, run on CPU with gloo.

megatron-core assumes CUDA in a few places that do not matter for the maths (device lookups, side streams, a
device-to-host copy of the all-to-all split sizes, and the CUDA generator state activation recomputation saves).
`install_cpu_shims()` replaces exactly those, as listed in /work/shared/FACTS.md plus that last one; package code
never calls it. `uneven_gloo_collectives()` gives gloo the two collectives with per-rank sizes that megatron's
dispatcher uses at ETP > 1 with EP > 1. `install_deepspeed_cpu_shims()` does the same for the CUDA
device calls OpenRLHF's policy actor makes by name (DeepSpeed itself has a CPU accelerator). Its own module so that
a Ray worker can install the shims at start-up (stub_site/sitecustomize.py) without importing the other helpers.
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
    import megatron.core.tensor_parallel.random as tp_random
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
    # Activation recomputation saves the CUDA generator's state with the host's and restores both before re-running
    # a layer (for dropout); on CPU the host generator, which it restores anyway, is the only one.
    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *args, **kwargs: None


def host_cuda_tensors() -> None:
    """Tensors asked for on "cuda" are made on the CPU, and `Tensor.cuda()` returns the tensor itself. For a worker
    process only (it is not undone): megatron's pipeline schedule makes its token counter on "cuda" by name, and a
    tied embedding's last-stage copy calls `.cuda()` before the all-reduce that initialises it (pp > 1)."""
    if getattr(torch, "_gmpo_host_cuda_tensors", False):
        return
    torch._gmpo_host_cuda_tensors = True

    def on_host(device):
        return torch.device("cpu") if _is_cuda(device) else device

    for name in ("tensor", "zeros", "empty", "ones", "full", "arange", "zeros_like", "empty_like", "ones_like"):
        factory = getattr(torch, name)

        def made_on_host(*args, _factory=factory, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = on_host(kwargs["device"])
            return _factory(*args, **kwargs)

        setattr(torch, name, made_on_host)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def uneven_gloo_collectives() -> None:
    """gloo's all_gather needs equal tensors, and gloo has no reduce_scatter; megatron's MoE dispatcher uses both with
    per-rank token counts when each expert is split over ETP ranks and the experts over EP ranks. Both are done here
    with equal-size gloo collectives: pad to the longest part, or all-reduce every part and keep this rank's. The
    results are the same tensors, sums in another order. For a worker process only (it is not undone)."""
    dist = torch.distributed
    if getattr(dist, "_gmpo_uneven_collectives", False):
        return
    dist._gmpo_uneven_collectives = True
    equal_all_gather = dist.all_gather

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        rows = [part.shape[0] for part in tensor_list]
        if async_op or all(part.shape == tensor.shape for part in tensor_list):
            return equal_all_gather(tensor_list, tensor, group=group, async_op=async_op)
        padded = tensor.new_zeros((max(rows), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in tensor_list]
        equal_all_gather(gathered, padded, group=group)
        for part, received, count in zip(tensor_list, gathered, rows, strict=True):
            part.copy_(received[:count])

    def reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if async_op:
            raise NotImplementedError("the emulated reduce_scatter is synchronous")
        whole = torch.cat([part.reshape(-1) for part in input_list])
        dist.all_reduce(whole, op=op, group=group)
        start = sum(part.numel() for part in input_list[: dist.get_rank(group)])
        output.copy_(whole[start : start + output.numel()].view_as(output))

    dist.all_gather = all_gather
    dist.reduce_scatter = reduce_scatter


def emulate_cuda_tensors() -> None:
    """Let megatron's GPU-only optimizer path (DistributedOptimizer over DDP's buffers) run on CPU, in a spawned
    worker only: tensors asked for on "cuda" are made on the CPU, `Tensor.cuda()` returns the tensor itself, and
    `Tensor.type()` names the CUDA type, which megatron checks parameters against. Call `torch.cuda.is_available`
    -> True only around building the DDP wrapper and the optimizer, so that the package takes its GPU branches."""

    host_cuda_tensors()
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


def install_deepspeed_cpu_shims() -> None:
    """Let OpenRLHF's DeepSpeed policy actor run on CPU (DeepSpeed picks its CPU accelerator and gloo by itself):
    the CUDA device calls OpenRLHF makes by name become no-ops or the host, and its "cuda" device mesh a CPU one.
    Must run before `openrlhf` is imported (stub_site/sitecustomize.py), which binds `init_device_mesh` by name."""
    import torch.distributed.device_mesh as device_mesh

    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.current_device = lambda: 0  # an index, as OpenRLHF formats it into "cuda:{index}"
    host_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        # Tensors sent to a CUDA device (an index, "cuda:0" or torch.device) stay on the host.
        if args and _is_cuda(args[0]):
            args = ("cpu", *args[1:])
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return host_to(self, *args, **kwargs)

    torch.Tensor.to = to
    torch.cuda.empty_cache = lambda: None
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.device = lambda *a, **k: contextlib.nullcontext()  # flash-attn's Triton kernels select the device
    cuda_mesh = device_mesh.init_device_mesh

    def init_device_mesh(device_type, *args, **kwargs):
        return cuda_mesh("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    device_mesh.init_device_mesh = init_device_mesh

    # gloo runs each async collective on a thread of its own, unordered; DeepSpeed 0.19.6's ZeRO-3 waits only for the
    # last of a batch of parameter all-gathers, so on gloo it can read a gathered parameter before it arrives (NaN
    # log-probs in ~1 of 5 runs here; DeepSpeed PR #8539). On CUDA one stream orders them: wait for each at launch.
    gather = torch.distributed.all_gather_into_tensor

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        work = gather(output_tensor, input_tensor, group=group, async_op=async_op)
        if async_op:
            work.wait()
        return work

    torch.distributed.all_gather_into_tensor = all_gather_into_tensor


def _is_cuda(device) -> bool:
    if isinstance(device, bool):
        return False
    return isinstance(device, int) or (isinstance(device, str | torch.device) and str(device).startswith("cuda"))
