"""The stability harness's preset ranges, seeds, RNG restore, config fingerprints and metrics files, at their edges.

Each case was a change to the code that the rest of the suite let through (a mutation-testing pass in the seventh
session, docs/architecture.md): a validation or bookkeeping rule could have been dropped or loosened unnoticed.
"""

import math
import re

import helpers_stability
import pytest


def _parse(overrides: dict):
    from openrlhf_gmpo.stability.config import parse_config

    return parse_config(helpers_stability.merged(helpers_stability.tiny_raw(), overrides), name="bad")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"rl": {"epochs": 65}}, "rl.epochs: 65 is outside the allowed range [1, 64]"),  # above the high bound
        ({"threads": 257}, "threads: 257 is outside the allowed range [1, 256]"),
        ({"rl": {"steps": True}}, "rl.steps: expected int, got True"),  # a bool is not an int here
        ({"seed": -1}, "seed: -1 is outside the allowed range [0, inf]"),
    ],
)
def test_more_bad_values_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _parse(overrides)


def test_an_empty_algos_mapping_is_refused():
    from openrlhf_gmpo.stability.config import parse_config

    raw = helpers_stability.tiny_raw()
    raw["algos"] = {}  # no algorithm to train: refused, not a run that trains nothing
    with pytest.raises(ValueError, match=re.escape("algos: expected a non-empty mapping")):
        parse_config(raw, name="bad")


def test_range_bounds_are_inclusive():
    # epochs 64, threads 256, samples_per_prompt 2 (with mini_batch 8 dividing 8*2): all on a bound, accepted.
    cfg = _parse({"rl": {"epochs": 64, "samples_per_prompt": 2, "mini_batch_size": 8}, "threads": 256, "seed": 0})
    assert (cfg.rl.epochs, cfg.threads, cfg.rl.samples_per_prompt, cfg.seed) == (64, 256, 2, 0)


def test_prompts_per_step_equal_to_train_tasks_is_accepted():
    cfg = _parse({"data": {"train_tasks": 8}})  # tiny's prompts_per_step is 8: equal is fine
    assert cfg.data.train_tasks == cfg.rl.prompts_per_step == 8


def test_eval_tasks_one_above_val_tasks_is_refused():
    with pytest.raises(ValueError, match=re.escape("rl.eval_tasks (257) exceeds data.val_tasks (256)")):
        _parse({"rl": {"eval_tasks": 257}})


def test_val_tasks_count_toward_the_task_space():
    # 38 tasks with numbers in 1..2 (see test_stability_config): 30 train fit alone, 30 + 9 = 39 do not.
    with pytest.raises(ValueError, match=re.escape("(30 + 9) exceeds the 38 distinct tasks")):
        _parse({"data": {"max_value": 2, "train_tasks": 30, "val_tasks": 9}, "rl": {"eval_tasks": 9}})
    cfg = _parse({"data": {"max_value": 2, "train_tasks": 30, "val_tasks": 8}, "rl": {"eval_tasks": 8}})
    assert cfg.data.train_tasks + cfg.data.val_tasks == 38  # exactly the bound: accepted


def test_an_int_written_for_a_float_is_a_float():
    cfg = _parse({"rl": {"weight_decay": 0}})
    assert type(cfg.rl.weight_decay) is float


# ----------------------------------------------------------------------------------------------------------------
# stability/state and stability/report


def test_derive_seed_separates_its_parts_and_fills_63_bits():
    from openrlhf_gmpo.stability.state import derive_seed

    assert derive_seed("ab", "c") != derive_seed("a", "bc")  # the separator keeps part boundaries
    seeds = [derive_seed("s", i) for i in range(64)]
    assert all(0 <= s < 2**63 for s in seeds)
    assert max(seeds) >= 2**40  # 8 bytes of digest, not 4 (2**31 at most)
    assert any(s >= 2**62 for s in seeds) or max(seeds) >= 2**61  # top bits used (shift by 1 keeps < 2**63)


def test_config_fingerprint_depends_on_every_part():
    from openrlhf_gmpo.stability.state import config_fingerprint

    assert config_fingerprint({"a": 1}, {"b": 2}) != config_fingerprint({"a": 1}, {"b": 3})


def test_restore_rng_restores_every_generator():
    import random

    import numpy as np
    import torch

    from openrlhf_gmpo.stability.state import capture_rng, restore_rng

    state = capture_rng()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restore_rng(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def test_set_determinism_on_cpu_turns_on_deterministic_algorithms():
    import torch

    from openrlhf_gmpo.stability.state import set_determinism

    threads, was = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        set_determinism(1, "cpu")  # the resume-is-bit-exact promise of the CPU runs rests on this
        assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1
    finally:
        torch.use_deterministic_algorithms(was, warn_only=True)
        torch.set_num_threads(threads)


def test_read_records_refuses_a_bad_line_in_the_middle(tmp_path):
    from openrlhf_gmpo.stability.report import json_line, read_records

    path = tmp_path / "m.jsonl"
    path.write_text(json_line({"step": 1}) + "\n{cut\n" + json_line({"step": 3}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not a JSON record")):
        read_records(path)


def test_json_line_round_trips_negative_infinity_and_nested_values(tmp_path):
    from openrlhf_gmpo.stability.report import _plain, json_line, read_records

    path = tmp_path / "m.jsonl"
    path.write_text(json_line({"step": 1, "x": -math.inf, "y": math.inf}) + "\n")
    assert read_records(path) == [{"step": 1, "x": -math.inf, "y": math.inf}]
    assert _plain({"a": [math.nan, (1.0, -math.inf)]}) == {"a": ["NaN", [1.0, "-Infinity"]]}


def test_report_table_shows_nan_for_a_nan_anywhere():
    from openrlhf_gmpo.stability.report import _nan_aware_extremes

    low, high = _nan_aware_extremes([1.0, math.nan, 2.0])  # plain min/max would give 1.0 and 2.0
    assert math.isnan(low) and math.isnan(high)
