"""Shared CountDown test data: one seeded task list, built once per test session."""

import functools

from openrlhf_gmpo.countdown.tasks import CountdownTask, generate_tasks

SEED = 1234


@functools.cache
def sample_tasks(n: int = 300) -> tuple[CountdownTask, ...]:
    """n tasks from the default generator settings (3-4 numbers in 1..99, target in 1..100)."""
    return tuple(generate_tasks(n, SEED))


@functools.cache
def sample_texts() -> tuple[tuple[CountdownTask, str, str], ...]:
    """(task, prompt text, SFT response) for every sample task (solving them is the slow part: done once)."""
    from openrlhf_gmpo.countdown.prompts import prompt_text, sft_response

    return tuple((task, prompt_text(task), sft_response(task)) for task in sample_tasks())


# Pieces an adversarial response is assembled from: tags (whole, broken, repeated), the grammar's characters,
# characters just outside it (unicode digits and operators, '.', '=', '**', '//'), code, and huge or deep text.
FUZZ_PIECES = (
    "<answer>", "</answer>", "<answer", "answer>", "</answer", "<think>", "</think>", "<|end|>",
    "(", ")", "+", "-", "*", "/", "×", "÷", " ", "\n", "\t", "0", "00", "07", "1", "9", "12", "99", "1.5", "=",
    "**", "//", "%", "٣", "３", "²", "½", "𝟗", "\x00", "\u202e", "1e999", "-1", "+1", "()", "(1)(2)",
    "__import__('os').system('echo pwned')", "exec('raise SystemExit')", "lambda: 0", "open('/etc/passwd')",
    "9" * 40, "9" * 400, "(" * 50, ")" * 50, "(" * 600, ")" * 600,
)  # fmt: skip


def _mutate(rng, text: str) -> str:
    """Up to three random edits: insert a piece, delete a character, or replace one."""
    for _ in range(rng.randint(0, 3)):
        i = rng.randint(0, len(text))
        edit = rng.random()
        if edit < 0.4:
            text = text[:i] + rng.choice(FUZZ_PIECES[8:24]) + text[i:]
        elif edit < 0.7:
            text = text[:i] + text[i + 1 :]
        else:
            text = text[:i] + rng.choice("0123456789+-*/() ") + text[i + 1 :]
    return text


def adversarial_responses(n: int, seed: int, max_chars: int = 4096):
    """n (response, numbers, target) triples, seeded: near-misses of correct answers, piece soups, huge texts."""
    import random

    from openrlhf_gmpo.countdown.tasks import solve

    rng = random.Random(seed)
    tasks = sample_tasks(50)
    solutions = [solve(t.numbers, t.target) for t in tasks]
    for _ in range(n):
        k = rng.randrange(len(tasks))
        task, solution = tasks[k], solutions[k]
        kind = rng.random()
        if kind < 0.4:  # a correct answer with a few edits, sometimes between other blocks
            response = f"<think>{rng.choice(FUZZ_PIECES)}</think><answer>{_mutate(rng, solution)}</answer>"
            if rng.random() < 0.2:
                response = rng.choice(("<answer>1</answer>", "<answer>", "</answer>")) + response
        elif kind < 0.8:  # a soup of pieces and the task's own numbers
            parts = [rng.choice(FUZZ_PIECES) if rng.random() < 0.7 else str(rng.choice(task.numbers))]
            parts += [
                rng.choice(FUZZ_PIECES) if rng.random() < 0.7 else str(rng.choice(task.numbers))
                for _ in range(rng.randint(0, 40))
            ]
            response = "".join(parts)
        else:  # long: filler up to max_chars with an answer block somewhere (or a deep one)
            depth = rng.choice((0, 10, 17, 1000))
            block = "<answer>" + "(" * depth + solution + ")" * depth + "</answer>"
            filler = rng.choice(FUZZ_PIECES) * (max_chars // 2)
            cut = rng.randint(0, max_chars)
            response = (filler[:cut] + block + filler)[:max_chars]
        yield response[:max_chars], task.numbers, task.target
