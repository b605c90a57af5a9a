"""`--engine megatron` (openrlhf_gmpo.megatron.StabilityEngine) against HFEngine on CPU, with real megatron-core.

megatron-core runs on CPU only after the test-only shims of helpers_megatron, which patch torch.cuda for the whole
process, and the engine initialises torch.distributed for the whole process. So every check runs in one subprocess
(this file run as a script, GPUs hidden, one thread), which saves what it measured; the tests read it.
Both engines are built from the same (size, vocab, seed), so they start from identical fp32 weights.
"""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

LR, GRAD_CLIP = 1e-3, 0.5  # the clip is below the measured grad norm (~5), so clipping is part of the comparison
ALGOS, RL_STEPS = ("gmpo", "grpo"), 2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("megatron_engine")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(out / "results.pt", weights_only=False)


def test_log_probs_equal_hf_engine(results):
    # fp32 on both sides on the same weights; the remaining difference is summation order (measured <= 1e-6).
    assert results["policy_error"] < 1e-4
    assert results["reference_error"] < 1e-4  # after a step of each engine, so policy and reference differ
    assert results["policy_moved"] > 1e-3  # ... by much more than the tolerance


def test_stats_come_from_an_hf_copy_with_the_same_weights(results):
    # After a train_step the HF copy was refreshed from megatron: its log-probs agree with megatron's.
    assert results["hf_copy_error"] < 1e-4
    # Entropy and router statistics equal HFEngine's on the same (initial) weights.
    assert results["entropy_error"] < 1e-4
    assert results["router"] == pytest.approx(results["hf_router"], abs=1e-6)


def test_train_step_moves_weights_like_hf_engine(results):
    step = results["step"]
    assert step["grad_norm"] == pytest.approx(step["hf_grad_norm"], rel=1e-5)
    assert step["hf_grad_norm"] > GRAD_CLIP
    for key, value in step["hf_metrics"].items():
        assert step["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # Adam's first step moves each weight by lr * g / (|g| + eps): by ~lr = 1e-3 where the gradient is clear of
    # eps = 1e-8, so a wrong gradient (mapping, mask, sign) shows as differences near 1e-3. Where |g| is comparable to
    # eps, the step amplifies fp32 summation-order differences in g by up to lr / eps: measured 8e-6 on 32 of the 2.6M
    # weights here (1.6e-5 on another batch). Hence a bound of lr / 20 for all, and 1e-6 for all but 1 in 10^4.
    assert step["max_diff"] < LR / 20
    assert step["count_over_1e-6"] < step["numel"] * 1e-4
    assert step["max_moved"] > LR / 2


def test_sampling_after_a_step_uses_the_updated_policy(results):
    # The megatron engine's generate equals HFEngine's loaded with the megatron engine's model_state.
    assert results["generate_equal"]


def test_model_state_round_trip_is_exact(results):
    assert results["round_trip_equal"]
    assert results["same_keys_as_hf"]
    assert results["restored_scores_equal"]  # loading the initial state gives the initial log-probs bit for bit


def test_optimizer_state_resumes_identically(results):
    resume = results["resume"]
    assert resume["grad_norm"] == resume["resumed_grad_norm"]
    assert resume["weights_equal"]
    assert resume["max_moved_second_step"] > 1e-4  # the second step did something to compare


def test_run_stability_with_megatron_engine(results):
    run = results["run"]
    assert [(r["algo"], r["step"]) for r in run["metrics"]] == [(a, s) for a in ALGOS for s in range(1, RL_STEPS + 1)]
    for record in run["metrics"]:
        assert not record["diverged"]
        assert all(math.isfinite(v) for v in record.values() if isinstance(v, float)), record
        assert 0 < record["router_entropy"] <= 1 and 1 / 8 <= record["expert_max_share"] <= 1
        assert record["updates"] == 2
    # step 1 scores the warm-start weights with the policy and with its frozen copy: KL exactly 0; later steps train
    assert run["metrics"][0]["kl_ref"] == 0.0
    assert max(r["grad_norm"] for r in run["metrics"]) > 0 and max(r["kl_ref"] for r in run["metrics"]) > 0
    assert set(run["verdict"]) == set(ALGOS)
    assert all(v["steps"] == RL_STEPS for v in run["verdict"].values())
    assert "- engine: megatron" in run["report"]


# ---- the subprocess ------------------------------------------------------------------------------------------------


def _batch(hf, eos_id: int, pad_id: int):
    """Sampled responses to prompts of different lengths (left-padded); row 0 ends early at an EOS."""
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [3, 4, 5, 6, 7, 8, 9, 10], [20, 21, 22, 23]]
    batch = hf.generate(prompts, max_new_tokens=12, greedy=False, seed=1)
    start = batch.prompt_len + 4
    batch.input_ids[0, start] = eos_id
    batch.input_ids[0, start + 1 :] = pad_id
    batch.attention_mask[0, start + 1 :] = 0
    return batch


def _gmpo_loss(batch, old_log_probs):
    from openrlhf_gmpo.losses import compute_policy_loss

    advantages = torch.tensor([1.0, -0.5, 0.8, -1.2])

    def loss_fn(log_probs):
        return compute_policy_loss(
            "gmpo", log_probs, old_log_probs, advantages, batch.action_mask, clip_eps_low=0.4, clip_eps_high=0.4
        )

    return loss_fn


def _max_abs(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b)[mask.bool()].abs().max().item()


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _engine_checks(make, eos_id: int, pad_id: int) -> dict:
    meg, hf = make("megatron"), make("hf")
    batch = _batch(hf, eos_id, pad_id)
    mask = batch.action_mask
    initial = hf.model_state()
    ours, theirs = meg.score(batch, with_stats=True), hf.score(batch, with_stats=True)
    out = {
        "entropy_error": _max_abs(ours.entropy, theirs.entropy, mask),
        "router": ours.router,
        "hf_router": theirs.router,
        "same_keys_as_hf": meg.model_state().keys() == initial.keys(),
    }
    # old log-probs off the current ones, so ratios differ from 1 and GMPO's clip is active
    noise = 0.3 * torch.randn(theirs.log_probs.shape, generator=torch.Generator().manual_seed(0))
    loss_fn = _gmpo_loss(batch, theirs.log_probs + noise)
    for engine in (meg, hf):
        engine.freeze_reference()
        engine.reset_optimizer(LR, 0.0, GRAD_CLIP)
    grad_norm, metrics = meg.train_step(batch, loss_fn)
    hf_grad_norm, hf_metrics = hf.train_step(batch, loss_fn)
    after, hf_after = meg.model_state(), hf.model_state()
    diffs = torch.cat([(after[k] - hf_after[k]).abs().flatten() for k in hf_after])
    out["step"] = {
        "grad_norm": grad_norm,
        "hf_grad_norm": hf_grad_norm,
        "metrics": metrics,
        "hf_metrics": hf_metrics,
        "max_diff": diffs.max().item(),
        "count_over_1e-6": int((diffs > 1e-6).sum()),
        "numel": diffs.numel(),
        "max_moved": max((hf_after[k] - initial[k]).abs().max().item() for k in initial),
    }
    policy, reference = meg.score(batch), meg.score(batch, reference=True)
    out["policy_error"] = _max_abs(policy.log_probs, hf.score(batch).log_probs, mask)
    out["reference_error"] = _max_abs(reference.log_probs, hf.score(batch, reference=True).log_probs, mask)
    out["policy_moved"] = _max_abs(policy.log_probs, reference.log_probs, mask)

    sampled = meg.generate([[5, 6, 7], [8, 9, 10, 11]], max_new_tokens=10, greedy=False, seed=3)
    loaded = make("hf")
    loaded.load_model_state(after)
    expected = loaded.generate([[5, 6, 7], [8, 9, 10, 11]], max_new_tokens=10, greedy=False, seed=3)
    out["generate_equal"] = torch.equal(sampled.input_ids, expected.input_ids)
    out["hf_copy_error"] = _max_abs(meg.hf.score(batch).log_probs, policy.log_probs, mask)

    meg.load_model_state(after)
    out["round_trip_equal"] = _states_equal(meg.model_state(), after)
    meg.load_model_state(initial)
    out["restored_scores_equal"] = torch.equal(meg.score(batch).log_probs, ours.log_probs)
    out["resume"] = _resume_check(meg, make, batch, loss_fn)
    return out


def _resume_check(meg, make, batch, loss_fn) -> dict:
    """Two steps in one engine, against one step, a save, and the second step in a fresh engine (as a resumed run)."""
    meg.reset_optimizer(LR, 0.01, GRAD_CLIP)
    meg.train_step(batch, loss_fn)
    saved_model, saved_optimizer = meg.model_state(), copy.deepcopy(meg.optimizer_state())
    grad_norm, _ = meg.train_step(batch, loss_fn)
    resumed = make("megatron")
    resumed.load_model_state(saved_model)
    resumed.reset_optimizer(LR, 0.01, GRAD_CLIP)  # run_algo's order: fresh optimizer, then the saved state
    resumed.load_optimizer_state(saved_optimizer)
    resumed_grad_norm, _ = resumed.train_step(batch, loss_fn)
    final = meg.model_state()
    return {
        "grad_norm": grad_norm,
        "resumed_grad_norm": resumed_grad_norm,
        "weights_equal": _states_equal(resumed.model_state(), final),
        "max_moved_second_step": max((final[k] - saved_model[k]).abs().max().item() for k in final),
    }


def _run_check(out_dir: Path) -> dict:
    """run_stability with engine="megatron" on the test suite's mini preset, cut to a 4-step SFT and 2 RL steps."""
    import helpers_stability
    import yaml

    from openrlhf_gmpo.stability.config import load_preset
    from openrlhf_gmpo.stability.runner import RunOptions, run_stability

    raw = helpers_stability.merged(helpers_stability.tiny_raw(), helpers_stability.MINI)
    raw = helpers_stability.merged(raw, {"sft": {"steps": 4}, "rl": {"steps": RL_STEPS, "eval_tasks": 4}})
    preset = out_dir / "mini_megatron.yaml"
    preset.write_text(yaml.safe_dump(raw))
    run_dir = out_dir / "run"
    opts = RunOptions(
        algos=ALGOS, steps=RL_STEPS, out_dir=run_dir, cache_dir=out_dir / "cache", engine="megatron", device="cpu"
    )
    run_stability(load_preset(str(preset)), opts, log=lambda *_: None)
    return {
        "metrics": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()],
        "verdict": json.loads((run_dir / "verdict.json").read_text()),
        "report": (run_dir / "report.md").read_text(),
    }


def main(out_dir: Path) -> None:
    import helpers_megatron

    from openrlhf_gmpo.countdown.tokenizer import build_tokenizer
    from openrlhf_gmpo.megatron import StabilityEngine
    from openrlhf_gmpo.stability.engine import make_engine

    torch.set_num_threads(1)
    helpers_megatron.install_cpu_shims()
    StabilityEngine.allow_cpu = True
    tokenizer = build_tokenizer()
    ids = dict(eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)

    def make(name):
        return make_engine(name, model_size="tiny", vocab_size=len(tokenizer), seed=0, device="cpu", **ids)

    results = _engine_checks(make, **ids)
    results["run"] = _run_check(out_dir)
    torch.save(results, out_dir / "results.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
