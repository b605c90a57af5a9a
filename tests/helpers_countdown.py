"""Shared CountDown test data: one seeded task list, built once per test session."""

import functools

from openrlhf_gmpo.countdown.tasks import CountdownTask, generate_tasks

SEED = 1234


@functools.cache
def sample_tasks(n: int = 300) -> tuple[CountdownTask, ...]:
    """n tasks from the default generator settings (3-4 numbers in 1..99, target in 1..100)."""
    return tuple(generate_tasks(n, SEED))
