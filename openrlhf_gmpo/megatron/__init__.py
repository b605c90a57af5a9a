"""megatron-core expert-parallel backend for Qwen3-MoE (and Qwen3 dense) inside OpenRLHF's PPO pipeline.

Modules: `parallel` (sizes and process groups), `model` (GPTModel from a HF config), `weights` (HF <-> megatron
mapping and streaming export), `logprobs` (vocab-parallel per-token log-probs), `train` (micro-batched policy update),
`actor` (the Ray policy actor), `args` (the `--megatron.*` flags). See docs/megatron.md.
"""
