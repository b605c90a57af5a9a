"""`MegatronPolicyActor.fit` with several optimizer steps per call, as the 30B-A3B presets take them (two updates of
512 samples per rollout of 1024), on a local Ray cluster (2 CPU actors, EP=2, DP=2; ~35 s).

Each rank holds 4 samples, `--train.batch_size 4` makes 2 steps per pass, and `--train.max_epochs 2` 2 passes: 4
optimizer steps, each over one sample pair per rank in the order of the pass's seeded permutation, all against the
rollout's old log-probs (stale from the second step on, so the ratios move away from 1), with OpenRLHF's rollout
correction on (vLLM's log-probs below the old ones by a per-sequence shift). The reference takes the same 4 steps
in one HF process with one AdamW.
"""

import helpers_actors as ha
import helpers_megatron as hm
import pytest
import ray
import torch

SEED, IS_CAP = 1, 1.01  # seeds 1 and 2 (the two passes) pair the samples differently: (1,3)(2,0), (0,1)(3,2)
SHIFT = torch.tensor([0.0, 0.005, 0.02, 0.05, 0.01, 0.0, 0.03, 0.002])  # mean(logp_old - logp_vllm) per sequence


def _batch() -> dict:
    """8 sequences: policy_batch() with two seeds; rank r holds rows 4r..4r+3."""
    first, second = hm.policy_batch(seed=1), hm.policy_batch(seed=2)
    return {key: torch.cat([first[key], second[key]]) for key in first}


def _old_and_rollout(batch):
    """The rollout's old log-probs (the initial HF model's) and vLLM's, SHIFT lower on each sequence's valid tokens."""
    with torch.no_grad():
        old = hm.hf_action_log_probs(hm.tiny_hf_moe(), batch)
    return old, old - SHIFT[:, None] * batch["action_mask"]


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    from openrlhf_gmpo.megatron.actor import MegatronPolicyActor

    pretrain = str(tmp_path_factory.mktemp("megatron_fit") / "pretrain")
    hm.tiny_hf_moe().save_pretrained(pretrain)
    args = ha.megatron_args(
        pretrain, 2, "--megatron.ep", "2", "--train.max_epochs", "2", "--train.seed", str(SEED),
        "--algo.advantage.is_correction_level", "seq", "--algo.advantage.is_correction_threshold", str(IS_CAP),
    )  # fmt: skip
    batch = _batch()
    old, rollout = _old_and_rollout(batch)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": ha.cpu_worker_env("megatron")})
    try:
        actors = ha.start_actors(ray.remote(num_gpus=0, num_cpus=1)(MegatronPolicyActor), args, pretrain)
        rows = [list(range(4 * rank, 4 * rank + 4)) for rank in range(2)]
        ray.get(
            [a.append.remote(hm.experience(batch, r, old[r], rollout[r])) for a, r in zip(actors, rows, strict=True)]
        )
        status = ray.get([a.fit.remote(kl_ctl=0) for a in actors], timeout=180)
        chunks = [{k: [batch[k][r]] for k in ("sequences", "action_mask", "attention_mask")} for r in rows]
        refs = [a.execute_batch.remote("forward", chunk, 0, 1) for a, chunk in zip(actors, chunks, strict=True)]
        new = [result[0] for result in ray.get(refs)]
    finally:
        ray.shutdown()
    return status, new


def _reference():
    """The actor's 4 steps in one process: per pass e, rank-local order randperm(4, seed + e); step k takes positions
    2k, 2k+1 of that order on both ranks. Returns the last step's grad norm, the steps' mean loss and the log-probs
    after."""
    from openrlhf_gmpo.losses import compute_policy_loss

    batch = _batch()
    old, rollout = _old_and_rollout(batch)
    model = hm.tiny_hf_moe()
    optimizer = torch.optim.AdamW(model.parameters(), lr=ha.STEP_LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    norms, losses = [], []
    for epoch in range(2):
        order = torch.randperm(4, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
        for step in range(2):
            rows = [4 * rank + i for rank in range(2) for i in order[2 * step : 2 * step + 2]]
            sub = {key: value[rows] for key, value in batch.items()}
            optimizer.zero_grad()
            loss, _ = compute_policy_loss(
                "gmpo", hm.hf_action_log_probs(model, sub), old[rows], sub["advantages"], sub["action_mask"],
                clip_eps_low=0.4, clip_eps_high=0.4, global_batch_size=4, dp_size=1,
                rollout_log_probs=rollout[rows], rollout_is_cap=IS_CAP,
            )  # fmt: skip
            loss.backward()
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), ha.STEP_MAX_NORM).item())
            losses.append(loss.item())
            optimizer.step()
    with torch.no_grad():
        return norms, sum(losses) / len(losses), hm.hf_action_log_probs(model, batch)


def test_four_steps_in_one_fit_are_the_hf_steps(fit_run):
    status, new = fit_run
    norms, mean_loss, reference_new = _reference()
    assert norms[0] > ha.STEP_MAX_NORM  # the steps clip
    mask = _batch()["action_mask"]
    for rank in range(2):
        # OpenRLHF reports the last step's norm and the mean of the steps' losses.
        assert status[rank]["actor_grad_norm"] == pytest.approx(norms[-1], rel=1e-4)
        assert status[rank]["policy_loss"] == pytest.approx(mean_loss, rel=1e-4)
        rows = list(range(4 * rank, 4 * rank + 4))
        torch.testing.assert_close(new[rank][mask[rows]], reference_new[rows][mask[rows]], atol=1e-4, rtol=0)
    # The rows moved: 4 Adam steps of lr 1e-3, far above the tolerance.
    with torch.no_grad():
        initial = hm.hf_action_log_probs(hm.tiny_hf_moe(), _batch())
    assert (reference_new - initial)[mask].abs().max() > 1e-2
