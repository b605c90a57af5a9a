"""`openrlhf-gmpo demo`: the table it prints, its JSON, and what it is meant to show."""

import argparse
import json
import math

import pytest

from openrlhf_gmpo import demo
from openrlhf_gmpo.losses import LOSS_NAMES


def parse(argv):
    parser = argparse.ArgumentParser(prog="openrlhf-gmpo")
    demo.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_demo_prints_a_row_per_loss_and_writes_json(tmp_path, capsys):
    out = tmp_path / "new" / "demo.json"  # a folder that does not exist yet is created
    args = parse(["demo", "--seed", "0", "--batch", "32", "--length", "128", "--json", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["loss"] for r in rows] == sorted(LOSS_NAMES, key=lambda n: (not n.startswith("gmpo"), n))
    for r in rows:
        assert r["loss"] in printed
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float))
    by_name = {r["loss"]: r for r in rows}
    # What the demo exists to show, on this seed: an outlier token (ratio up to e^8) drives GRPO's per-token gradient
    # weight to its own ratio (> 100x the on-policy gradient), while GMPO's weight, its sequence's geometric-mean
    # ratio, stays near 1, and the unnormalised product (gmpo_no_norm) explodes.
    assert by_name["grpo"]["max_token_weight"] > 100
    assert by_name["gmpo"]["max_token_weight"] < 2
    assert by_name["gmpo_no_norm"]["max_token_weight"] > 1e4
    assert by_name["gmpo"]["grad_norm"] < by_name["grpo"]["grad_norm"] / 10


def test_demo_is_deterministic():
    assert demo.compare_losses(3, 8, 32) == demo.compare_losses(3, 8, 32)


@pytest.mark.parametrize("flag", ["--batch", "--length"])
def test_demo_rejects_non_positive_sizes(flag, capsys):
    with pytest.raises(SystemExit):
        parse(["demo", flag, "0"])
    assert f"argument {flag}: must be an integer >= 1, got 0" in capsys.readouterr().err


def test_demo_is_reachable_from_the_console_entry_point(capsys):
    from openrlhf_gmpo.cli import main

    assert main(["demo", "--batch", "4", "--length", "16", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 sequences x 16 tokens, seed 1" in out and "gmpo_seq_clip" in out
