import itertools
from fractions import Fraction

import helpers_countdown
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_gmpo.countdown import tasks
from openrlhf_gmpo.countdown.prompts import prompt_text, sft_response
from openrlhf_gmpo.countdown.scorer import evaluate, literals, parse, score
from openrlhf_gmpo.countdown.tasks import CountdownTask, generate_tasks, reachable, solve, solve_tree


def test_same_seed_same_tasks_other_seed_other_tasks():
    assert generate_tasks(50, 7) == generate_tasks(50, 7)
    assert generate_tasks(50, 7) != generate_tasks(50, 8)


def test_tasks_respect_settings_and_are_distinct():
    tasks = helpers_countdown.sample_tasks()
    assert len(set(tasks)) == len(tasks)
    assert {len(t.numbers) for t in tasks} == {3, 4}
    assert all(1 <= n <= 99 for t in tasks for n in t.numbers)
    assert all(1 <= t.target <= 100 for t in tasks)


def test_every_task_is_solved_and_the_solution_scores_full():
    for task, _, response in helpers_countdown.sample_texts():
        expression = solve(task.numbers, task.target)
        assert expression is not None, task
        assert evaluate(parse(expression)) == task.target
        assert score(f"<answer>{expression}</answer>", task.numbers, task.target) == 1.0, (task, expression)
        # The SFT trace ends in the same answer, so it scores 1.0 as well.
        assert score(response, task.numbers, task.target) == 1.0


def test_every_step_of_a_worked_solution_evaluates_to_what_it_says():
    # "a op b=v": the left side parsed and evaluated exactly as the scorer does, equal to v (a fraction p/q included).
    # 3 3 8 8 -> 24 goes through 8/3 and 1/3: its last step must read 8/(1/3), not 8/1/3 (= 8/3).
    tasks = [task for task, _, _ in helpers_countdown.sample_texts()] + [CountdownTask((3, 3, 8, 8), 24)]
    for task in tasks:
        think = sft_response(task).split("<think>")[1].split("</think>")[0]
        for step in think.split(","):
            left, right = step.split("=")
            assert evaluate(parse(left)) == evaluate(parse(right)), (task, step)
    assert sft_response(CountdownTask((3, 3, 8, 8), 24)).startswith("<think>8/3=8/3,3-(8/3)=1/3,8/(1/3)=24</think>")


def test_solver_hand_examples():
    # 28 from 44, 19, 35: (44+19)-35 passes through 63, (44-35)+19 only through 9 and 28 (largest value 44, the
    # input itself), so the simplest-tree rule (no fraction, no negative, smallest largest value) picks the latter.
    assert solve((44, 19, 35), 28) == "(44-35)+19"
    # Three ones reach at most 3 (1+1+1): 100 is unreachable.
    assert solve((1, 1, 1), 100) is None
    # 3, 3, 8, 8 -> 24 needs a fraction: 8/(3-8/3) = 8/(1/3) = 24.
    expression = solve((3, 3, 8, 8), 24)
    assert expression is not None and evaluate(parse(expression)) == 24
    # Every number must be used: 5 from (2, 3, 5) is not "5" alone but e.g. 5*(3-2).
    expression = solve((2, 3, 5), 5)
    assert sorted(literals(parse(expression))) == [2, 3, 5] and evaluate(parse(expression)) == 5


@settings(max_examples=300, deadline=None)
@given(
    numbers=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=4),
    extra_target=st.integers(min_value=-50, max_value=200),
)
def test_solve_tree_finds_the_tree_reachable_keeps(numbers, extra_target):
    # solve_tree searches the whole set for the target only; it must pick the same simplest tree as the exhaustive
    # table (the SFT traces, and every warm start recorded in docs/, depend on it), and None where there is none.
    table = reachable(numbers)
    reachable_ints = sorted(int(v) for v in table if v.denominator == 1)
    for target in {*reachable_ints[::8], *reachable_ints[-3:], extra_target, 0}:
        assert solve_tree(numbers, target) == table.get(target), (numbers, target)
    for target in (reachable_ints[0] + 0.0, 0.5, 0.1):  # floats compare exactly: 0.5 may be reached, 0.1 never
        assert solve_tree(numbers, target) == table.get(target), (numbers, target)


def test_reachable_values_of_two_numbers():
    # 6 and 3: 6+3, 6-3, 3-6, 6*3, 6/3, 3/6 -> {9, 3, -3, 18, 2, 1/2}
    assert set(reachable((6, 3))) == {Fraction(v) for v in (9, 3, -3, 18, 2)} | {Fraction(1, 2)}


def test_prompt_and_trace_text():
    task = CountdownTask((44, 19, 35), 28)
    assert prompt_text(task) == "Use 44 19 35 to make 28."
    assert sft_response(task) == "<think>44-35=9,9+19=28</think><answer>(44-35)+19</answer>"
    with pytest.raises(ValueError, match="no solution"):
        sft_response(CountdownTask((1, 1, 1), 100))


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(min_numbers=2, max_numbers=4), r"min_numbers must be >= 3 .*got 2"),
        (dict(min_numbers=4, max_numbers=3), r"min_numbers \(4\) must be <= max_numbers \(3\)"),
        (dict(max_numbers=9), r"max_numbers must be <= 5 .*got 9"),
        (dict(min_value=0), "min_value must be >= 1, got 0"),
        (dict(min_value=50, max_value=10), r"min_value \(50\) must be <= max_value \(10\)"),
        (dict(min_target=10, max_target=5), r"min_target \(10\) must be <= max_target \(5\)"),
    ],
)
def test_impossible_settings_name_the_value(settings, message):
    with pytest.raises(ValueError, match=message):
        generate_tasks(1, 0, **settings)


def test_too_small_task_space_is_an_error_not_a_hang(monkeypatch):
    # Numbers all 1, three of them: the only tuple is (1, 1, 1), which reaches {1, 2, 3}: 3 tasks, counted, so 5 are
    # refused at once (the loose bound, 1 tuple x 8 targets since an expression is at most prod(x_i + 1), would not).
    with pytest.raises(ValueError, match=r"5 distinct tasks asked for, but 3-3 numbers in 1..1 .* allow at most 3;"):
        generate_tasks(5, 0, min_numbers=3, max_numbers=3, min_value=1, max_value=1)
    # Numbers 1..3, 3-4 of them, targets 1..100: counted with the tree-building solver, 1524 tasks (the loose bound,
    # 27 x 64 + 81 x 100 = 9,828, let the CLI's default 10,550 draw for minutes before failing).
    exact = sum(
        sum(1 for v in reachable(numbers) if v.denominator == 1 and 1 <= v <= 100)
        for count in (3, 4)
        for numbers in itertools.product((1, 2, 3), repeat=count)
    )
    assert exact == 1524
    for n in (10550, 2000):  # 2000 is far below the loose bound too: counted all the same
        with pytest.raises(ValueError, match=rf"{n} distinct tasks asked for, but 3-4 numbers in 1..3 .* most 1524;"):
            generate_tasks(n, 0, max_value=3)
    # Where counting would take too long (switched off here), the loose bound lets the request through and the draws
    # give up, naming what they found.
    monkeypatch.setattr(tasks, "EXACT_COUNT_BUDGET", 0)
    tasks.task_space_bound.cache_clear()
    try:
        with pytest.raises(
            ValueError, match="could draw only 3 distinct solvable tasks of the 5 asked for; raise max_value"
        ):
            generate_tasks(5, 0, min_numbers=3, max_numbers=3, min_value=1, max_value=1)
        with pytest.raises(ValueError, match=r"10550 distinct tasks asked for, but 3-4 numbers in 1..3 .* most 9828;"):
            generate_tasks(10550, 0, max_value=3)
    finally:
        tasks.task_space_bound.cache_clear()  # no loose bound left cached for later tests


def test_negative_n_is_refused():
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        generate_tasks(-1, 0)
