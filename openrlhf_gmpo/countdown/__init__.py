"""CountDown toy task for MoE stability runs: tasks and solver, datasets, safe scorer and OpenRLHF reward file,
character-level tokenizer, Qwen3-MoE model factory (docs/countdown.md)."""
