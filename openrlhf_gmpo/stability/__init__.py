"""`openrlhf-gmpo stability`: GMPO vs GRPO on CountDown with a small Qwen3-MoE on one machine, with report and verdict.

Entry point: openrlhf_gmpo.stability.runner.run_stability (the CLI lives in openrlhf_gmpo.stability.cli).
"""
