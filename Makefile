# The two set-up commands of the README. Each installs what it needs into .venv first (idempotent, ~2 min fresh).
.PHONY: install demo test

install:
	bash tools/install.sh

# The main job: GMPO vs GRPO stability check on the tiny CountDown MoE (CPU, ~3.5 min, nothing downloaded).
# Writes runs/stability-tiny/{report.md,verdict.json,metrics.jsonl,*.png}; a rerun resumes from its checkpoints.
demo: install
	.venv/bin/openrlhf-gmpo stability --preset tiny

# The whole test suite, lint included (tests/test_lint.py runs ruff and shellcheck).
test: install
	.venv/bin/python -m pytest
