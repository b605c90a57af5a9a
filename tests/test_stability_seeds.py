"""`--seeds` / `--seed`: one run per seed with a summary of passes; the seed override --parallel's children use."""

import json

import helpers_stability
import pytest

from openrlhf_gmpo.cli import main as cli_main
from openrlhf_gmpo.stability.rl_loop import TIMING_KEYS
from openrlhf_gmpo.stability.seeds import parse_seeds


def test_parse_seeds_takes_lists_and_ranges_in_order():
    assert parse_seeds("3") == [3]
    assert parse_seeds("1, 2,5-7") == [1, 2, 5, 6, 7]
    assert parse_seeds("9,0-1") == [9, 0, 1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,a", "'a' is not a seed"),
        ("-1", "'-1' is not a seed"),
        ("5-3", "the range 5-3 runs backwards"),
        ("1,2,1", "seed 1 is named twice"),
        ("0-100", "more than 100 seeds"),
        ("", "'' is not a seed"),
    ],
)
def test_bad_seeds_are_refused_by_value(text, message):
    with pytest.raises(ValueError, match=message):
        parse_seeds(text)


def _comparable(path):
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in path.read_text().splitlines()
    ]


def test_seeds_run_each_seed_in_its_own_folder_and_count_the_passes(tmp_path, capsys):
    preset = helpers_stability.write_mini_preset(tmp_path)
    common = ["--preset", str(preset), "--algos", "gmpo", "--steps", "2", "--cache-dir", str(tmp_path / "cache"),
              "--device", "cpu"]  # fmt: skip
    assert cli_main(["stability", *common, "--seeds", "2,5", "--out", str(tmp_path / "many")]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "many" / "seeds.json").read_text())
    assert summary["seeds"] == [2, 5]
    gmpo = summary["algos"]["gmpo"]
    verdicts = {s: json.loads((tmp_path / "many" / f"seed-{s}" / "verdict.json").read_text())["gmpo"] for s in (2, 5)}
    assert gmpo["seeds"] == 2 and gmpo["passed"] == sum(v["passed"] for v in verdicts.values())
    for run in gmpo["runs"]:
        verdict = verdicts[run["seed"]]
        assert run["token_ratio_min"] == verdict["checks"]["token_ratio_range"]["min"]
        assert run["kl_max"] == verdict["checks"]["kl_ref"]["max"]
    assert f"gmpo: {gmpo['passed']} of 2 seeds pass" in printed
    assert "seed 2: gmpo:" in printed and "seed 5: gmpo:" in printed
    assert f"## gmpo: {gmpo['passed']} of 2 seeds pass" in (tmp_path / "many" / "seeds.md").read_text()

    # Different seeds draw different data and samples; --seed 5 alone is exactly the seed-5 run of --seeds.
    many = tmp_path / "many"
    assert _comparable(many / "seed-2" / "metrics.jsonl") != _comparable(many / "seed-5" / "metrics.jsonl")
    assert cli_main(["stability", *common, "--seed", "5", "--out", str(tmp_path / "one")]) == 0
    assert _comparable(tmp_path / "one" / "metrics.jsonl") == _comparable(many / "seed-5" / "metrics.jsonl")
    assert json.loads((tmp_path / "one" / "run.json").read_text())["config"]["seed"] == 5


def test_seed_and_seeds_are_exclusive_and_checked(tmp_path, capsys):
    preset = str(helpers_stability.write_mini_preset(tmp_path))
    with pytest.raises(SystemExit):
        cli_main(["stability", "--preset", preset, "--seed", "1", "--seeds", "1-2"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--seed must be >= 0, got -3"):
        cli_main(["stability", "--preset", preset, "--seed", "-3"])
    with pytest.raises(SystemExit, match="'x' is not a seed"):
        cli_main(["stability", "--preset", preset, "--seeds", "x"])
