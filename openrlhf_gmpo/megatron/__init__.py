"""megatron-core expert-parallel backend for Qwen3-MoE (and Qwen3 dense) inside OpenRLHF's PPO pipeline.

Modules: `parallel` (sizes and process groups), `model` (GPTModel from a HF config), `weights` (HF <-> megatron
mapping and streaming export), `logprobs` (vocab-parallel per-token log-probs), `train` (micro-batched policy update),
`pipeline` (the same passes through pipeline stages),
`actor` (the Ray policy actor), `args` (the `--megatron.*` flags), `stability_engine` (`StabilityEngine`, the
stability harness's `--engine megatron`). See docs/megatron.md.
"""

from openrlhf_gmpo.megatron.stability_engine import StabilityEngine

__all__ = ["StabilityEngine"]
