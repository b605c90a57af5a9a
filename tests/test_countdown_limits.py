"""CountDown task generation and data files at their limits: the task space, target ranges, solver bounds, bad
records.

Each case was a change to the code that the rest of the suite let through (a mutation-testing pass in the seventh
session, docs/architecture.md): a validation or bookkeeping rule could have been dropped or loosened unnoticed.
"""

import json
import re

import pytest


def test_solver_limits_name_the_value():
    from openrlhf_gmpo.countdown.tasks import solve

    with pytest.raises(ValueError, match="1 to 6 values"):
        solve((1,) * 7, 10)  # 7 numbers: over the exact solver's limit
    with pytest.raises(ValueError, match="non-negative ints, got True"):
        solve((True, 2, 3), 5)
    assert solve((0, 2, 3), 6) is not None  # 0 + 2*3: a zero is a valid number (non-negative)


def test_single_number_solves_only_itself():
    from openrlhf_gmpo.countdown.tasks import solve

    assert solve((7,), 7) == "7" and solve((7,), 8) is None


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(min_numbers=3, max_numbers=6), r"max_numbers must be <= 5 .*got 6"),
        (dict(min_numbers=5, max_numbers=4), r"min_numbers \(5\) must be <= max_numbers \(4\)"),
        (dict(min_value=0, max_value=5), "min_value must be >= 1, got 0"),
        (dict(min_target=-5, max_target=-1), "max_target must be >= 0, got -1"),
    ],
)
def test_boundary_settings_are_refused(settings, message):
    from openrlhf_gmpo.countdown.tasks import generate_tasks

    with pytest.raises(ValueError, match=message):
        generate_tasks(1, 0, **settings)


def test_exactly_the_task_space_is_drawable_one_more_is_refused():
    from openrlhf_gmpo.countdown.tasks import generate_tasks, task_space_bound

    # (1, 1, 1) reaches 1, 2, 3 (1*1*1, 1+1*1... , 1+1+1): 3 tasks, all drawable; 4 refused at once.
    assert task_space_bound(3, 3, 1, 1, 1, 100) == 3
    assert sorted(t.target for t in generate_tasks(3, 0, min_numbers=3, max_numbers=3, max_value=1)) == [1, 2, 3]
    with pytest.raises(ValueError, match="4 distinct tasks asked for"):
        generate_tasks(4, 0, min_numbers=3, max_numbers=3, max_value=1)


def test_the_whole_small_task_space_is_drawn_despite_repeats():
    from openrlhf_gmpo.countdown.tasks import generate_tasks

    # 3 numbers in 1..2, targets 1..30: 38 tasks (test_stability_config's count). Drawing all 38 needs many repeated
    # draws (the rarest task has probability 1/8 x 1/6), which the 100 n + 1000 draw budget allows.
    tasks = generate_tasks(38, 0, min_numbers=3, max_numbers=3, max_value=2, max_target=30)
    assert len(set(tasks)) == 38


def test_targets_include_max_target():
    from openrlhf_gmpo.countdown.tasks import _targets

    assert _targets((1, 1, 1), 1, 3) == [1, 2, 3]  # 3 = 1+1+1 is in range 1..3
    # 2, 3 reach 5, -1, 1, 6, 2/3, 3/2: the integers in 1..10 are 1, 5, 6 (3/2 is not the target 1)
    assert _targets((2, 3), 1, 10) == [1, 5, 6]


def test_loose_bound_caps_targets_at_prod_x_plus_one():
    from openrlhf_gmpo.countdown import tasks

    tasks.task_space_bound.cache_clear()
    old = tasks.EXACT_COUNT_BUDGET
    tasks.EXACT_COUNT_BUDGET = 0
    try:
        # 3 numbers in 1..1: 1 tuple, expressions at most (1+1)^3 = 8, targets 1..8 -> 8; with max_target 5 -> 5.
        assert tasks.task_space_bound(3, 3, 1, 1, 1, 100) == 8
        assert tasks.task_space_bound(3, 3, 1, 1, 1, 5) == 5
    finally:
        tasks.EXACT_COUNT_BUDGET = old
        tasks.task_space_bound.cache_clear()


def test_load_tasks_names_a_record_without_a_label(tmp_path):
    from openrlhf_gmpo.countdown.data import load_tasks

    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: bad CountDown record")):
        load_tasks(path)


def test_load_tasks_skips_blank_lines_and_counts_lines_from_one(tmp_path):
    from openrlhf_gmpo.countdown.data import load_tasks, prompt_record
    from openrlhf_gmpo.countdown.tasks import CountdownTask

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(prompt_record(CountdownTask((44, 19, 35), 28))) + "\n\n[1]\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: expected a JSON object, got list")):
        load_tasks(path)
    path.write_text(json.dumps(prompt_record(CountdownTask((44, 19, 35), 28))) + "\n\n")
    assert load_tasks(path) == [CountdownTask((44, 19, 35), 28)]  # number order kept


def test_write_datasets_refuses_negative_counts_and_keeps_sft_disjoint(tmp_path):
    from openrlhf_gmpo.countdown.data import load_tasks, read_jsonl, write_datasets

    with pytest.raises(ValueError, match="n_val must be >= 0, got -1"):
        write_datasets(tmp_path, 0, 2, -1, 2)
    paths = write_datasets(tmp_path, 0, 3, 2, 4)
    train, val = load_tasks(paths["train.jsonl"]), load_tasks(paths["val.jsonl"])
    sft = read_jsonl(paths["sft_train.jsonl"])
    sft_val = read_jsonl(paths["sft_val.jsonl"])
    assert len(sft) == 4  # n_sft, not n_train + n_sft
    prompts = {r["prompt"] for r in sft}
    from openrlhf_gmpo.countdown.prompts import prompt_text

    assert not prompts & {prompt_text(t) for t in train + val}
    assert [r["prompt"] for r in sft_val] == [prompt_text(t) for t in val]
