"""Grouped-GEMM MoE experts for megatron-core's local (no Transformer Engine) layer spec.

Without Transformer Engine, megatron-core 0.19 runs the experts of an MoE layer one at a time (`SequentialMLP`):
two small GEMMs and an activation per expert, 128 experts per layer for Qwen3-30B-A3B. `GroupedExperts` runs all
local experts with one `torch._grouped_mm` for fc1 (gate and up together, they are one weight), one fused weighted
SwiGLU, and one grouped GEMM for fc2, forward and backward. It is a drop-in for `SequentialMLP`:

- it subclasses `SequentialMLP`, so construction, parameter names and shapes
  (`local_experts.{i}.linear_fc1.weight` [2F, H], `local_experts.{i}.linear_fc2.weight` [H, F]),
  `sharded_state_dict`, checkpoints and the HF mapping are unchanged;
- `forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs) -> (output, None)`, with the probs applied
  after the activation as megatron's expert `MLP` does (SwiGLU always through megatron's weighted SwiGLU Function,
  which MLP uses only with `bias_activation_fusion`);
- on CPU, where grouped_mm is missing, or for a config the grouped path does not cover (fp8/fp4, biases, latent MoE,
  TE activation, delayed wgrad), it logs one line and runs `SequentialMLP.forward` unchanged.

Weight storage. Each expert keeps its own Parameter (names and optimizer state as before), but the module lays the
per-expert weights out back to back in one tensor, so `[E, N, K]` is a strided *view* of them: the grouped GEMM reads
the weights in place, and the weight gradient comes out as one `[E, N, K]` tensor whose per-expert slices are handed
to the Parameters without copying. The alternative, `torch.stack` every step, copies every expert weight once in the
forward and holds that copy until the backward: for 128 experts x 4.7M bf16 weights that is 1.2 GB written and kept
per layer per micro-batch, which the view avoids. If something re-homes the weights so they are no longer evenly
spaced (`model.to(...)` is handled by re-stacking in `_apply`, megatron DDP's distributed-optimizer buffer by listing
the experts backwards in `named_modules`; padding at a bucket boundary inside the experts can break it), the forward
still works: it detects that, logs it once and falls back to `torch.stack` (`bench/bench_moe_layer.py` measures that
case as "scattered weights").

The one entry point, for building a local layer spec on CUDA without TE (expert tensor parallel size must be 1):

    from dataclasses import replace
    from openrlhf_gmpo.megatron.grouped_experts import grouped_experts_submodule

    layer_spec = get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False, qk_layernorm=True,
                                          normalization="RMSNorm")
    moe = layer_spec.submodules.mlp  # functools.partial(MoELayer, submodules=MoESubmodules(...))
    moe.keywords["submodules"] = replace(moe.keywords["submodules"], experts=grouped_experts_submodule())
"""

from __future__ import annotations

import logging
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP

logger = logging.getLogger(__name__)

# The public name where this torch has it (2.13 does), else the private op it wraps, with the same arguments.
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_logged: set[str] = set()


def grouped_experts_submodule() -> partial:
    """The experts builder to put in `MoESubmodules.experts` of megatron-core's local spec (see module docstring)."""
    return partial(
        GroupedExperts,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear, activation_func=None),
    )


def stacked_view(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """`[E, *w.shape]` view of equally shaped weights laid out at a constant positive spacing in one storage.

    Returns None when they are not (different storages, reverse order, overlapping, not contiguous).
    """
    first = weights[0]
    if not first.is_contiguous():
        return None
    base = first.untyped_storage().data_ptr()
    step = weights[1].storage_offset() - first.storage_offset() if len(weights) > 1 else first.numel()
    if step < first.numel():  # overlapping or reversed
        return None
    for index, weight in enumerate(weights):
        if (
            weight.shape != first.shape
            or weight.dtype != first.dtype
            or weight.device != first.device
            or not weight.is_contiguous()
            or weight.untyped_storage().data_ptr() != base
            or weight.storage_offset() != first.storage_offset() + index * step
        ):
            return None
    return first.detach().as_strided((len(weights), *first.shape), (step, *first.stride()), first.storage_offset())


class _GroupedLinear(torch.autograd.Function):
    """`out[rows of expert e] = x[rows of expert e] @ weights[e].T`, rows grouped by the int32 end `offsets`.

    Takes the per-expert Parameters themselves, so each one gets its own gradient (a slice of one grouped wgrad).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, offsets: torch.Tensor, stacked: torch.Tensor | None, *weights: torch.Tensor):
        if stacked is None:
            stacked = torch.stack(weights)  # a copy each step; see the module docstring
        x = x.contiguous()  # grouped GEMM kernels take row-major activations
        ctx.save_for_backward(x, offsets, stacked)
        if x.shape[0] == 0:  # no tokens on this rank: empty operands are an edge case of grouped GEMM kernels
            return x.new_empty(0, stacked.shape[1])
        return _grouped_mm(x, stacked.transpose(1, 2), offs=offsets)  # [T, N]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, offsets, stacked = ctx.saved_tensors
        # No tokens reached these experts (possible with EP); an empty grad may have 0 strides that grouped_mm rejects.
        if grad_out.shape[0] == 0:
            return torch.zeros_like(x), None, None, *torch.zeros_like(stacked).unbind(0)
        grad_out = grad_out.contiguous()
        grad_x = _grouped_mm(grad_out, stacked, offs=offsets) if ctx.needs_input_grad[0] else None  # [T, K]
        # 2D x 2D form: the token dimension is split by `offsets`, one [N, K] product per expert. Experts without
        # tokens get 0 on CPU and Hopper (pytorch/pytorch#172439 reports otherwise on Blackwell; tests check it).
        grad_weights = _grouped_mm(grad_out.t(), x, offs=offsets)  # [E, N, K]
        return grad_x, None, None, *grad_weights.unbind(0)


class GroupedExperts(SequentialMLP):
    """`SequentialMLP` whose forward runs all local experts as grouped GEMMs (see the module docstring)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, name=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection, name=name)
        etp = self.tp_group.size() if self.tp_group is not None else 1
        if etp != 1:
            raise ValueError(
                f"GroupedExperts needs expert tensor parallel size 1, got {etp} "
                f"(tensor_model_parallel_size={config.tensor_model_parallel_size}, "
                f"expert_tensor_parallel_size={config.expert_tensor_parallel_size}); use SequentialMLP or ETP=1"
            )
        self.config_fallback_reason = _unsupported_config_reason(self.config)
        # torch's CPU grouped_mm is a reference implementation; tests switch this on to check the grouped path.
        self.run_grouped_on_cpu = False
        self._view_cache: dict[str, tuple] = {}
        self._stack_expert_weights()

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        reason = self.fallback_reason(permuted_local_hidden_states)
        if reason is not None:
            _log_once(f"{reason}; running the experts one by one (SequentialMLP)")
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        return self.grouped_forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs), None

    def fallback_reason(self, hidden: torch.Tensor) -> str | None:
        """Why this input cannot take the grouped path, or None if it can."""
        if self.config_fallback_reason is not None:
            return self.config_fallback_reason
        if _grouped_mm is None:
            return f"torch {torch.__version__} has no grouped_mm"
        if hidden.device.type == "cpu" and not self.run_grouped_on_cpu:
            return "grouped_mm is not used on CPU"
        if hidden.device.type == "cuda" and torch.cuda.get_device_capability(hidden.device) < (8, 0):
            return "grouped_mm needs a CUDA GPU of compute capability 8.0 or newer"
        if hidden.device.type not in ("cpu", "cuda"):
            return f"grouped_mm is not used on {hidden.device.type}"
        fc1 = self.local_experts[0].linear_fc1.weight
        # grouped GEMM kernels need every row stride to be a multiple of 16 bytes
        if any(size * hidden.element_size() % 16 for size in (*fc1.shape, fc1.shape[0] // 2)):
            return f"expert weight sizes {tuple(fc1.shape)} are not multiples of 16 bytes in {hidden.dtype}"
        return None

    def grouped_forward(self, hidden, tokens_per_expert, probs):
        """All local experts at once: [T, H] tokens sorted by expert -> [T, H]."""
        if self.config.moe_apply_probs_on_input:
            # Same as SequentialMLP: scale the input, then run the experts with unit probs.
            hidden = (probs.unsqueeze(-1) * hidden).to(hidden.dtype)
            probs = torch.ones_like(probs)
        if hidden.device.type == "cuda" and not _has_fast_grouped_mm(hidden):
            _log_once(
                f"torch's grouped_mm has a fused kernel for bf16 on compute capability 9.0/10.0 only; with "
                f"{hidden.dtype} on {torch.cuda.get_device_capability(hidden.device)} it loops over the experts"
            )
        # Group ends as int32 on the device: no host sync, unlike SequentialMLP's tokens_per_expert.tolist().
        offsets = torch.cumsum(tokens_per_expert.to(hidden.device), 0, dtype=torch.int32)
        fc1 = _GroupedLinear.apply(hidden, offsets, *self._weights_and_view("linear_fc1"))
        activated = self._weighted_activation(fc1, probs)
        return _GroupedLinear.apply(activated, offsets, *self._weights_and_view("linear_fc2"))

    def _weights_and_view(self, linear_name: str) -> list:
        """[stacked view or None, *per-expert weights]; the view is re-checked only when a weight's address moves."""
        weights = [getattr(expert, linear_name).weight for expert in self.local_experts]
        # Checking the layout costs ~0.2 ms of host time per call for 128 experts; addresses alone ~20x less. The cached
        # view keeps the old storage alive, so a moved weight cannot reappear at the same address unnoticed.
        addresses = tuple(weight.data_ptr() for weight in weights)
        cached = self._view_cache.get(linear_name)
        if cached is None or cached[0] != addresses:
            cached = self._view_cache[linear_name] = (addresses, stacked_view(weights))
            if cached[1] is None:
                _log_once(f"{linear_name} expert weights are not evenly laid out in one tensor; copying them each step")
        return [cached[1], *weights]

    def _weighted_activation(self, fc1_out, probs):
        """The activation of megatron's expert MLP, scaled by each token's routing prob (MLP.forward's branches)."""
        config = self.config
        plain_swiglu = config.activation_func_clamp_value is None and config.glu_linear_offset == 0.0
        if config.gated_linear_unit and config.activation_func is F.silu and plain_swiglu:
            # megatron's weighted SwiGLU Function: the same function as MLP's unfused branch below, but it keeps only
            # its input for the backward. MLP uses it only with bias_activation_fusion; it needs neither Apex nor TE.
            return weighted_bias_swiglu_impl(fc1_out, None, probs.unsqueeze(-1), config.activation_func_fp8_input_store)
        if config.gated_linear_unit:
            gate, linear = torch.chunk(fc1_out, 2, dim=-1)
            if (clamp := config.activation_func_clamp_value) is not None:
                gate = gate.clamp(min=None, max=clamp)
                linear = linear.clamp(min=-clamp, max=clamp)
            activated = config.activation_func(gate) * (linear + config.glu_linear_offset)
        else:
            activated = config.activation_func(fc1_out)
        return (activated * probs.unsqueeze(-1)).to(activated.dtype)

    def _stack_expert_weights(self) -> None:
        """Move each kind of expert weight into one [E, N, K] tensor; the Parameters become views of it."""
        for linear_name in ("linear_fc1", "linear_fc2"):
            params = [getattr(expert, linear_name).weight for expert in self.local_experts]
            if stacked_view(params) is not None:
                continue
            stacked = torch.stack([param.detach() for param in params])
            for index, param in enumerate(params):
                param.data = stacked[index]

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        """nn.Module's, with the experts listed last to first (names unchanged).

        megatron DDP with the distributed optimizer moves every parameter into one buffer in the reverse of this
        order; listed backwards, the experts land there first to last at a constant spacing, so the strided view
        (no per-step copy) survives it. `parameters()` follows this order; `state_dict()` does not.
        """
        memo = set() if memo is None else memo
        if self in memo:
            return
        if remove_duplicate:
            memo.add(self)
        yield prefix, self
        for name, module in self._modules.items():
            child_prefix = prefix + ("." if prefix else "") + name
            if module is not self.local_experts:
                yield from module.named_modules(memo, child_prefix, remove_duplicate)
            elif module not in memo:
                if remove_duplicate:
                    memo.add(module)
                yield child_prefix, module
                for index in reversed(range(len(module))):
                    yield from module[index].named_modules(memo, f"{child_prefix}.{index}", remove_duplicate)

    def _apply(self, fn, recurse=True):
        # `.to()`, `.cuda()`, `.bfloat16()` give each Parameter its own new storage; lay them out together again.
        super()._apply(fn, recurse)
        self._stack_expert_weights()
        return self


def _has_fast_grouped_mm(hidden: torch.Tensor) -> bool:
    """Where torch runs grouped_mm as one CUTLASS kernel; elsewhere it falls back to a loop of matmuls."""
    return hidden.dtype == torch.bfloat16 and torch.cuda.get_device_capability(hidden.device) in ((9, 0), (10, 0))


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning("GroupedExperts: %s", message)


def _unsupported_config_reason(config) -> str | None:
    """The first config feature the grouped path does not implement, in words; None if it covers the config."""
    checks = [
        (config.fp8 or config.fp4, "fp8/fp4 experts"),
        (config.add_bias_linear, "expert biases (add_bias_linear)"),
        (config.moe_latent_size is not None, "latent MoE (moe_latent_size)"),
        (config.use_te_activation_func, "Transformer Engine activation (use_te_activation_func)"),
        (config.delay_wgrad_compute, "delayed weight gradients (delay_wgrad_compute)"),
        (
            config.bias_activation_fusion and not (config.gated_linear_unit and config.activation_func is F.silu),
            "a fused activation other than SwiGLU",
        ),
    ]
    for unsupported, what in checks:
        if unsupported:
            return f"{what} is not supported by the grouped path"
    return None
