# The two set-up commands of the README. Each installs what it needs into .venv first (idempotent, ~2 min fresh).
.PHONY: install demo test

install:
	bash tools/install.sh

# The main job: GMPO vs GRPO stability check on the tiny CountDown MoE, CPU only, nothing downloaded.
demo: install
	.venv/bin/openrlhf-gmpo demo

# The whole test suite, lint included (tests/test_lint.py runs ruff and shellcheck).
test: install
	.venv/bin/python -m pytest
