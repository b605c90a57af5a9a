"""End to end on CPU: a miniature tiny-preset run through the CLI, and exact resume after a simulated kill."""

import dataclasses
import json
import shutil

import helpers_stability
import matplotlib.image
import pytest
import torch
import yaml

from openrlhf_gmpo.cli import main as cli_main
from openrlhf_gmpo.stability.config import load_preset
from openrlhf_gmpo.stability.rl_loop import TIMING_KEYS
from openrlhf_gmpo.stability.runner import RunOptions, run_stability

STEPS = 4  # helpers_stability.MINI: eval every 2 steps, checkpoint every 2 steps
PER_STEP_KEYS = {
    "algo", "step", "train_reward", "train_accuracy", "response_length", "entropy", "kl_ref", "expert_max_share",
    "router_entropy", "token_ratio_min", "token_ratio_max", "seq_ratio_min", "seq_ratio_max", "clip_frac_low",
    "clip_frac_high", "approx_kl", "grad_norm", "step_time_s", "generate_s", "score_s", "update_s",
}  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("stability")


@pytest.fixture(scope="module")
def cli_run(workdir):
    """One uninterrupted run through the real console entry point; shares its warm-start cache with the resume test."""
    preset = helpers_stability.write_mini_preset(workdir)
    out = workdir / "uninterrupted"
    argv = ["stability", "--preset", str(preset), "--algos", "gmpo,grpo", "--steps", str(STEPS), "--out", str(out),
            "--cache-dir", str(workdir / "cache"), "--device", "cpu", "--fresh"]  # fmt: skip
    assert cli_main(argv) == 0
    return preset, out


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_run_writes_every_output(cli_run):
    _, out = cli_run
    lines = _lines(out / "metrics.jsonl")
    # one line per algorithm per step, gmpo first
    assert [(r["algo"], r["step"]) for r in lines] == [(a, s) for a in ("gmpo", "grpo") for s in range(1, STEPS + 1)]
    for record in lines:
        assert PER_STEP_KEYS <= set(record), PER_STEP_KEYS - set(record)
        # validation runs on steps 2 and 4 only (eval_every 2)
        assert ("val_accuracy" in record) == (record["step"] % 2 == 0)
        # 8 rollouts / mini-batch 4 = 2 optimizer steps per RL step, so the ratio range is a min/max over both
        assert record["updates"] == 2
        assert record["token_ratio_min"] <= record["token_ratio_mean"] <= record["token_ratio_max"]
        # Before any update the ratios differ from 1 only by how the kernels round a 4-row batch against the 8-row
        # scoring pass: in fp32 on CPU by ~5e-7.
        assert 1 - 1e-5 < record["token_ratio_min_first"] <= record["token_ratio_max_first"] < 1 + 1e-5
        assert 0 < record["router_entropy"] <= 1 and 1 / 8 <= record["expert_max_share"] <= 1
    # step 1 scores the warm-start weights themselves: KL to them is exactly 0
    assert lines[0]["kl_ref"] == 0.0

    verdict = json.loads((out / "verdict.json").read_text())
    assert set(verdict) == {"gmpo", "grpo"}
    for algo_verdict in verdict.values():
        assert algo_verdict["steps"] == STEPS
        assert set(algo_verdict["checks"]) == {"finite", "token_ratio_range", "kl_ref", "val_accuracy"}
        assert algo_verdict["passed"] == all(c["passed"] for c in algo_verdict["checks"].values())
        assert algo_verdict["checks"]["val_accuracy"]["final_step"] == STEPS
        assert algo_verdict["checks"]["token_ratio_range"]["allowed"] == [0.001, 1000.0]  # tiny preset: max ratio 1000

    report = (out / "report.md").read_text()
    assert "## gmpo:" in report and "## grpo:" in report and "| token ratio max |" in report
    # 20 SFT steps leave the mini model short of the preset's 0.2 accuracy: the report says so next to the numbers
    assert "- warm start reached the expected accuracy: False" in report
    for name in ("ratio_range.png", "training_curves.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = matplotlib.image.imread(out / name).shape
        assert height > 200 and width > 400
    assert (out / "checkpoints" / "gmpo.pt").is_file() and (out / "checkpoints" / "grpo.pt").is_file()


class Killed(Exception):
    pass


def _comparable(path):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in _lines(path)]


def test_killed_run_resumes_to_the_same_metrics(cli_run, workdir):
    preset, uninterrupted = cli_run
    cfg = load_preset(str(preset))
    opts = RunOptions(algos=("gmpo", "grpo"), steps=STEPS, out_dir=workdir / "killed", cache_dir=workdir / "cache",
                      device="cpu", fresh=True)  # fmt: skip

    def kill_after_gmpo_step_3(algo, step):
        if (algo, step) == ("gmpo", 3):
            raise Killed

    with pytest.raises(Killed):
        run_stability(cfg, opts, on_step_end=kill_after_gmpo_step_3, log=lambda *_: None)
    # step 3 was logged but not checkpointed (checkpoint_every 2); grpo never started
    assert [r["step"] for r in _lines(opts.out_dir / "metrics.jsonl")] == [1, 2, 3]
    assert not (opts.out_dir / "checkpoints" / "grpo.pt").exists()

    # The stopped run's report, from what it logged (all 3 steps, not just the 2 checkpointed), without training.
    argv = ["stability", "--preset", str(preset), "--steps", str(STEPS), "--out", str(opts.out_dir),
            "--cache-dir", str(workdir / "cache"), "--device", "cpu", "--report-only"]  # fmt: skip
    with pytest.raises(SystemExit, match="no step records of grpo"):
        cli_main(argv)
    assert cli_main([*argv, "--algos", "gmpo"]) == 0
    assert json.loads((opts.out_dir / "verdict.json").read_text())["gmpo"]["steps"] == 3
    assert "- steps recorded (run stopped or still going): {'gmpo': 3}" in (opts.out_dir / "report.md").read_text()
    assert [r["step"] for r in _lines(opts.out_dir / "metrics.jsonl")] == [1, 2, 3]  # left as the run wrote it

    resumed = RunOptions(**{**opts.__dict__, "fresh": False})
    run_stability(cfg, resumed, log=lambda *_: None)
    # bit-identical metrics except wall-clock timings: same prompts, samples, updates and evaluations
    assert _comparable(opts.out_dir / "metrics.jsonl") == _comparable(uninterrupted / "metrics.jsonl")
    assert json.loads((opts.out_dir / "verdict.json").read_text()) == json.loads(
        (uninterrupted / "verdict.json").read_text()
    )


def test_parallel_run_trains_each_algorithm_in_its_own_process_to_the_same_metrics(cli_run, workdir):
    preset, uninterrupted = cli_run
    out = workdir / "parallel"
    # Resume a parallel run from a sequential one's checkpoint: gmpo already has steps 1-2, grpo starts from scratch.
    (out / "checkpoints").mkdir(parents=True)
    cfg = load_preset(str(preset))
    run_stability(cfg, RunOptions(algos=("gmpo",), steps=2, out_dir=out, cache_dir=workdir / "cache", device="cpu"),
                  log=lambda *_: None)  # fmt: skip
    argv = ["stability", "--preset", str(preset), "--steps", str(STEPS), "--out", str(out),
            "--cache-dir", str(workdir / "cache"), "--device", "cpu", "--parallel"]  # fmt: skip
    assert cli_main(argv) == 0
    # Two child processes, same seeds and CPU threads: identical to the sequential run, merged in algorithm order.
    assert _comparable(out / "metrics.jsonl") == _comparable(uninterrupted / "metrics.jsonl")
    assert json.loads((out / "verdict.json").read_text()) == json.loads((uninterrupted / "verdict.json").read_text())
    logs = {algo: (out / "logs" / f"{algo}.log").read_text() for algo in ("gmpo", "grpo")}
    assert "gmpo: resuming after step 2" in logs["gmpo"] and "resuming" not in logs["grpo"]
    assert "grpo step 4:" in logs["grpo"]
    assert not list(out.glob("metrics-*.jsonl"))  # the children's files were merged and removed


def test_parallel_child_that_fails_is_named_with_its_log(cli_run, workdir, tmp_path, monkeypatch):
    from openrlhf_gmpo.stability import parallel

    preset, _ = cli_run
    real_command = parallel.child_command

    def command(preset, cfg, opts, algo, device):  # gmpo's child gets a flag it does not know: it exits with code 2
        return [*real_command(preset, cfg, opts, algo, device), *(["--no-such-flag"] if algo == "gmpo" else [])]

    monkeypatch.setattr(parallel, "child_command", command)
    out = tmp_path / "out"
    argv = ["stability", "--preset", str(preset), "--steps", "1", "--out", str(out),
            "--cache-dir", str(workdir / "cache"), "--device", "cpu", "--parallel"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"gmpo exited with code 2 \(see .*gmpo\.log\)"):
        cli_main(argv)
    assert "unrecognized arguments: --no-such-flag" in (out / "logs" / "gmpo.log").read_text()
    assert "grpo step 1:" in (out / "logs" / "grpo.log").read_text()  # the other child still finished


def test_fresh_deletes_the_runs_outputs_and_nothing_else(cli_run, workdir, tmp_path, capsys):
    preset, uninterrupted = cli_run
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    (out / "notes.txt").write_text("the user's own file")
    argv = ["stability", "--preset", str(preset), "--algos", "gmpo", "--steps", "1", "--out", str(out),
            "--cache-dir", str(workdir / "cache"), "--device", "cpu", "--fresh"]  # fmt: skip
    assert cli_main(argv) == 0
    # Trained again from step 1, not resumed from the 4-step checkpoint; GRPO's metrics and checkpoint are gone too.
    printed = capsys.readouterr().out
    assert "gmpo step 1:" in printed and "resuming" not in printed
    assert [(r["algo"], r["step"]) for r in _lines(out / "metrics.jsonl")] == [("gmpo", 1)]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["gmpo.pt"]
    assert (out / "notes.txt").read_text() == "the user's own file"


def test_a_checkpoint_of_other_settings_is_refused_before_the_warm_start(cli_run, tmp_path):
    # The seed-1 run's checkpoints under --seed 3: refused before drawing tasks, building the model or training the
    # warm start (minutes on the 200m preset), for --parallel runs in the parent too.
    preset, uninterrupted = cli_run
    out = tmp_path / "out"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    cfg = dataclasses.replace(load_preset(str(preset)), seed=3)
    opts = RunOptions(algos=("gmpo", "grpo"), steps=STEPS, out_dir=out, cache_dir=tmp_path / "cache", device="cpu")
    logs = []
    with pytest.raises(SystemExit, match=r"gmpo\.pt was written with other training settings"):
        run_stability(cfg, opts, log=logs.append)
    assert logs == [] and not (tmp_path / "cache").exists()


def test_resume_ignores_settings_that_do_not_change_training(cli_run, workdir, tmp_path):
    preset, uninterrupted = cli_run
    # New verdict bounds, another algorithm in the preset, the other decode cache: the checkpoints still resume,
    # so a finished run can be re-judged or extended without retraining.
    changes = {"verdict": {"max_kl": 0.01}, "rl": {"decode_cache": "static"},
               "algos": {"gmpo_clip02": {"loss": "gmpo", "clip_eps_low": 0.2, "clip_eps_high": 0.2}}}  # fmt: skip
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(helpers_stability.merged(yaml.safe_load(preset.read_text()), changes)))
    out = tmp_path / "out"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    logs = []
    opts = RunOptions(algos=("gmpo", "grpo"), steps=STEPS, out_dir=out, cache_dir=workdir / "cache", device="cpu")
    run_stability(load_preset(str(other)), opts, log=logs.append)
    assert "gmpo: resuming after step 4" in logs and "grpo: resuming after step 4" in logs
    assert _comparable(out / "metrics.jsonl") == _comparable(uninterrupted / "metrics.jsonl")
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["gmpo"]["checks"]["kl_ref"]["allowed_max"] == 0.01  # judged with the new bound
    # Fewer steps than a checkpoint holds is refused, naming both numbers, rather than reporting 4 steps as 2.
    with pytest.raises(SystemExit, match=r"gmpo\.pt already holds 4 steps of gmpo, more than --steps 2"):
        run_stability(load_preset(str(other)), RunOptions(**{**opts.__dict__, "steps": 2}), log=logs.append)


def test_a_diverging_run_stops_and_fails_its_verdict(workdir, tmp_path, monkeypatch):
    from openrlhf_gmpo.stability.hf_engine import HFEngine

    real_step, armed = HFEngine.train_step, []

    def poisoned_step(self, batch, loss_fn):
        # Once armed, the next update leaves a NaN in the weights, as a blown-up update would.
        result = real_step(self, batch, loss_fn)
        if armed:
            armed.clear()
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(HFEngine, "train_step", poisoned_step)
    cfg = load_preset(str(helpers_stability.write_mini_preset(workdir)))
    assert cfg.rl.epochs * cfg.rl.rollout_batch_size // cfg.rl.mini_batch_size > 1  # step 2 scores after the NaN

    def arm_after_step_1(algo, step):
        if step == 1:
            armed.append(True)

    opts = RunOptions(algos=("gmpo",), steps=STEPS, out_dir=tmp_path, cache_dir=workdir / "cache", device="cpu")
    run_stability(cfg, opts, on_step_end=arm_after_step_1, log=lambda *_: None)
    records = _lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]  # stopped at the step that went non-finite
    assert records[-1]["diverged"] is True
    verdict = json.loads((tmp_path / "verdict.json").read_text())["gmpo"]
    assert verdict["passed"] is False and verdict["checks"]["finite"]["passed"] is False
    assert "| nan |" in (tmp_path / "report.md").read_text()  # the table shows it, not a min/max that skipped it


def test_warm_start_solves_each_training_task_once(workdir, tmp_path, monkeypatch):
    # 20 SFT steps of 16 tasks draw 320 tasks from 64: solving per step would call the solver 320 times.
    from openrlhf_gmpo.countdown.tokenizer import build_tokenizer
    from openrlhf_gmpo.stability import data
    from openrlhf_gmpo.stability.data import split_tasks
    from openrlhf_gmpo.stability.hf_engine import HFEngine
    from openrlhf_gmpo.stability.warmstart import warm_start

    cfg = load_preset(str(helpers_stability.write_mini_preset(workdir)))
    tokenizer = build_tokenizer()
    engine = HFEngine(model_size=cfg.model.size, vocab_size=len(tokenizer), seed=cfg.seed, device="cpu",
                      eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)  # fmt: skip
    train, val = split_tasks(cfg.data, cfg.seed)
    solved = []
    real_solve = data.sft_response
    monkeypatch.setattr(data, "sft_response", lambda task: solved.append(task) or real_solve(task))
    warm_start(engine, tokenizer, cfg, train, val[: cfg.rl.eval_tasks], tmp_path / "warm.pt", log=lambda *_: None)
    assert cfg.sft.steps * cfg.sft.batch_size > len(train) == 64
    assert sorted(solved, key=repr) == sorted(train, key=repr)
