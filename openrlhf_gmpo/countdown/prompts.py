"""Prompt and SFT-response text for CountDown.

The model reads characters, so the prompt is one short sentence (~30 characters, e.g. "Use 44 19 35 to make 28.")
and the worked solution lists the solver's steps in evaluation order before the answer:

    <think>44+19=63,63-35=28</think><answer>(44+19)-35</answer>
"""

from fractions import Fraction

from openrlhf_gmpo.countdown.tasks import CountdownTask, Tree, evaluate_tree, render, solve_tree

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


def prompt_text(task: CountdownTask) -> str:
    """The user message: the numbers in their given order, then the target."""
    return f"Use {' '.join(str(n) for n in task.numbers)} to make {task.target}."


def _format_value(value: int | Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _steps(tree: Tree, out: list[str]) -> str:
    """Append one 'a op b=v' step per inner node (post-order) and return the text naming the tree's value as an
    operand: a fraction or a negative value in parentheses, so that '8/(1/3)=24' reads as it evaluates."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    a, b = _steps(left, out), _steps(right, out)
    value = evaluate_tree(tree)
    text = _format_value(value)
    out.append(f"{a}{op}{b}={text}")
    return text if value.denominator == 1 and value >= 0 else f"({text})"


def sft_response(task: CountdownTask) -> str:
    """A short worked solution ending in the answer; raises ValueError if the task has no solution."""
    tree = solve_tree(task.numbers, task.target)
    if tree is None:
        raise ValueError(f"task has no solution: {task!r}")
    steps: list[str] = []
    _steps(tree, steps)
    return f"{THINK_OPEN}{','.join(steps)}{THINK_CLOSE}{ANSWER_OPEN}{render(tree)}{ANSWER_CLOSE}"
