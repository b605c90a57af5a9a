"""Preset loading: the shipped presets parse, and bad values raise errors that name the key."""

import re
import subprocess
import sys
from pathlib import Path

import helpers_stability
import pytest
import torch

from openrlhf_gmpo.cli import main as cli_main
from openrlhf_gmpo.stability.config import load_preset, parse_config


@pytest.mark.parametrize("name", ["tiny", "200m"])
def test_shipped_presets_load(name):
    cfg = load_preset(name)
    assert cfg.name == name
    assert set(cfg.algos) == {"gmpo", "grpo"}
    # every RL step makes several optimizer steps, so ratios move off 1 and clipping matters
    assert cfg.rl.epochs * cfg.rl.rollout_batch_size // cfg.rl.mini_batch_size >= 2


def _parse(overrides: dict):
    return parse_config(helpers_stability.merged(helpers_stability.tiny_raw(), overrides), name="bad")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # a typo names the key and the closest valid one
        ({"rl": {"max_new_token": 64}}, "unknown key 'rl.max_new_token'; did you mean 'rl.max_new_tokens'?"),
        ({"sedd": 3}, "unknown key 'sedd'; did you mean 'seed'?"),
        # wrong type: a string where an int belongs, a bool where a float belongs
        ({"rl": {"steps": "ten"}}, "rl.steps: expected int, got 'ten'"),
        ({"rl": {"lr": True}}, "rl.lr: expected float, got True"),
        ({"rl": {"lr": "fast"}}, "rl.lr: expected a number, got 'fast'"),
        ({"rl": {"lr": float("nan")}}, "rl.lr: NaN is not allowed"),
        ({"rl": 3}, "rl: expected a mapping, got 3"),
        ({"algos": ["gmpo"]}, "algos: expected a non-empty mapping of algorithm name"),
        ({"rl": {"decode_cache": "paged"}}, "rl.decode_cache: 'paged' is not one of"),
        # out of range
        ({"rl": {"samples_per_prompt": 1}}, "rl.samples_per_prompt: 1 is outside the allowed range [2, inf]"),
        ({"verdict": {"max_token_ratio": 0.5}}, "verdict.max_token_ratio: 0.5 is outside the allowed range"),
        ({"data": {"min_numbers": 2}}, "data.min_numbers: 2 is outside the allowed range [3, 5]"),
        # relations between keys
        ({"rl": {"mini_batch_size": 7}}, "rl.mini_batch_size (7) must divide the rollout batch"),
        ({"data": {"min_numbers": 4, "max_numbers": 3}}, "data.min_numbers (4) exceeds data.max_numbers (3)"),
        ({"data": {"train_tasks": 6}}, "rl.prompts_per_step (8) exceeds data.train_tasks (6)"),
        ({"rl": {"eval_tasks": 300}}, "rl.eval_tasks (300) exceeds data.val_tasks (256)"),
        # three numbers in 1..2 make 8 ordered tuples reaching 3-6 targets each, 38 tasks: not 4000 + 256
        (
            {"data": {"max_value": 2}},
            "data.train_tasks + data.val_tasks (4000 + 256) exceeds the 38 distinct tasks that "
            "data.min_numbers..max_numbers 3..3, data.max_value 2 and data.max_target 30 allow",
        ),
        ({"model": {"size": "huge"}}, "model.size: 'huge' is not one of 200m, tiny"),
        (
            {"algos": {"gmpo": {"loss": "gmpo", "clip_eps_low": 0.0, "clip_eps_high": 0.4}}},
            "algos.gmpo.clip_eps_low: 0.0",
        ),
        # an unknown loss names the algorithm and suggests the closest registered loss
        ({"algos": {"gmpo": {"loss": "gmop"}}}, "algos.gmpo.loss: unknown loss 'gmop'; did you mean 'gmpo'?"),
        ({"algos": {"gmpo": {"loss": "gmpo", "clip_eps": 0.4}}}, "unknown key 'algos.gmpo.clip_eps'"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _parse(overrides)


def test_a_float_written_without_a_dot_is_read_as_a_number():
    # YAML 1.1 reads `1e-5` as a string; the preset means the number.
    assert _parse({"rl": {"lr": "1e-5"}}).rl.lr == 1e-5


def test_a_preset_that_is_not_a_mapping_is_named():
    with pytest.raises(ValueError, match=re.escape("expected a mapping at the top level, got list")):
        parse_config([1, 2], name="bad")


def test_missing_key_is_named():
    raw = helpers_stability.tiny_raw()
    del raw["rl"]["grad_clip"]
    with pytest.raises(ValueError, match=re.escape("missing key 'rl.grad_clip'")):
        parse_config(raw, name="bad")


def test_unknown_preset_name_lists_shipped_ones():
    with pytest.raises(ValueError, match="neither a shipped preset .*200m.*tiny"):
        load_preset("tinyy")


def test_megatron_engine_on_cpu_asks_for_cuda_or_the_hf_engine():
    from openrlhf_gmpo.stability.engine import make_engine

    # megatron-core runs on CPU only with test-only patches (tests/helpers_megatron.py): production code refuses.
    with pytest.raises(SystemExit, match=r"--engine megatron needs CUDA .*use --engine hf"):
        make_engine("megatron", model_size="tiny", vocab_size=40, seed=0, device="cpu", eos_id=2, pad_id=0)


def test_unknown_algo_on_the_command_line_names_it(tmp_path):
    from openrlhf_gmpo.stability.runner import RunOptions, run_stability

    opts = RunOptions(algos=("gspo",), steps=1, out_dir=tmp_path, cache_dir=tmp_path)
    with pytest.raises(SystemExit, match="--algos: 'gspo' is not in preset 'tiny' \\(it has gmpo, grpo\\)"):
        run_stability(load_preset("tiny"), opts)


def test_an_algorithm_named_twice_is_refused(tmp_path):
    # Twice the same name would train it twice into one checkpoint (two processes with --parallel).
    with pytest.raises(SystemExit, match=re.escape("--algos 'gmpo,grpo,gmpo': gmpo named more than once")):
        cli_main(["stability", "--preset", "tiny", "--algos", "gmpo,grpo,gmpo", "--out", str(tmp_path)])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "tinyy"], "--preset tinyy: neither a shipped preset (200m, tiny) nor an existing YAML file"),
        (["--preset", "tiny", "--algos", " , "], "--algos ' , ': name at least one algorithm"),
        (["--preset", "tiny", "--steps", "0"], "--steps must be >= 1, got 0"),
        (["--preset", "tiny", "--part"], "--part trains exactly one algorithm, got the preset's gmpo, grpo"),
        (["--preset", "tiny", "--device", "cuda"], "--device cuda: CUDA is not available on this machine"),
    ],
    ids=["unknown preset", "no algorithm", "zero steps", "part of two", "cuda without a GPU"],
)
def test_bad_command_line_values_are_named_before_any_work(tmp_path, argv, message):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match=re.escape(message)):
        cli_main(["stability", *argv, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    assert not (tmp_path / "cache").exists()  # nothing drawn or trained


def test_the_step_bench_names_a_bad_preset():
    bench = Path(__file__).resolve().parents[1] / "bench" / "bench_stability_step.py"
    done = subprocess.run(
        [sys.executable, str(bench), "--preset", "tinyy"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert "--preset tinyy: neither a shipped preset (200m, tiny)" in done.stderr


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("seed: [1, 2\n")
    with pytest.raises(SystemExit, match=f"--preset {re.escape(str(path))}: not valid YAML"):
        cli_main(["stability", "--preset", str(path), "--out", str(tmp_path / "out")])


def test_out_that_is_or_lies_under_a_file_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    for out in (path, path / "run"):
        with pytest.raises(SystemExit, match=re.escape(f"--out {out}: {path} exists and is not a directory")):
            cli_main(["stability", "--preset", "tiny", "--out", str(out)])
    assert path.read_text() == "keep me"


def test_megatron_engine_on_cpu_is_refused_before_any_data_is_drawn(tmp_path):
    argv = ["stability", "--preset", "tiny", "--engine", "megatron", "--device", "cpu", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=re.escape("--engine megatron needs CUDA (this run's device is cpu)")):
        cli_main(argv)
    assert not (tmp_path / "run" / "cache").exists()
