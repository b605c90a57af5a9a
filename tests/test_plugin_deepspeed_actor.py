"""OpenRLHF's DeepSpeed policy actor with our loss installed, trained for two steps on a local Ray cluster.

`GMPOPolicyModelActor` (what the launcher starts for the DeepSpeed backend) in 2 CPU actors, three runs (`RUNS`):
GMPO under ZeRO-2 and under ZeRO-3 (the Qwen3-30B-A3B preset's stage), our GSPO under ZeRO-2; over gloo on
DeepSpeed's CPU accelerator; bf16 weights with fp32 master weights, `--ds.enable_sleep` as the presets set it, the
tiny Qwen3-MoE checkpoint. Past the actor's Ray wrapper everything is OpenRLHF's and DeepSpeed's own:
`init_model_from_pretrained` (its `Actor`, tokenizer, DeepSpeed engine and fused Adam, `ActorPPOTrainer`, then our
`install_policy_loss`), `execute_batch("forward")`, `append`, `fit` -> `ppo_train` -> `training_step`. flash-attn's
Triton cross-entropy, which OpenRLHF's Actor runs on fp32 logits, runs in Triton's interpreter (TRITON_INTERPRET=1).
Only the CUDA device calls OpenRLHF makes by name are shimmed, and, for ZeRO-3, gloo's unordered async all-gathers
(`install_deepspeed_cpu_shims`, installed in the workers by stub_site/sitecustomize.py).
DeepSpeed compiles two CPU ops on first use (~50 s; cached after).

Step 1 starts at the rollout policy (every ratio 1); step 2 reuses step 1's old log-probs, so its ratios move away
from 1 and the small clip (0.02) clips some tokens: the metrics OpenRLHF logs then have something to show. The
rollout correction (`--algo.advantage.is_correction_level seq`, cap 1.01) is on throughout: vLLM's log-probs equal
the old policy's in step 1 (weight 1) and sit below them by ROLLOUT_SHIFT per sequence in step 2 (weights e^shift,
two of them capped).
"""

import math

import helpers_actors as ha
import helpers_megatron as hm
import helpers_plugin
import pytest
import ray
import torch

from openrlhf_gmpo.losses.registry import clip_level
from openrlhf_gmpo.openrlhf_plugin.loss_adapter import CLI_TO_REGISTRY

LR, MAX_NORM, IS_CAP = 1e-3, 0.1, 1.01
# (loss, ZeRO stage, clip): GMPO's log-space clip small enough to act on many tokens in step 2. Our GSPO clips whole
# sequences, and OpenRLHF weights its clip fractions by sequences: step 2's sequence log-ratios are +0.062, -0.087,
# +0.108, -0.090 (advantages +, -, +, -; measured), so 0.1 clips the third only, 1 of 4 sequences but 4 of 22 tokens.
RUNS = {"gmpo-zero2": ("gmpo", 2, 0.02), "gmpo-zero3": ("gmpo", 3, 0.02), "gspo_ours-zero2": ("gspo_ours", 2, 0.1)}
ROLLOUT_SHIFT = torch.tensor([0.0, 0.005, 0.02, 0.05])  # mean(logp_old - logp_rollout) of each sequence in step 2
TOKEN_METRICS = (
    "token_ratio_min",
    "token_ratio_max",
    "token_ratio_mean",
    "clip_frac_low",
    "clip_frac_high",
    "approx_kl",
)
SEQUENCE_METRICS = ("seq_ratio_min", "seq_ratio_max", "seq_clip_frac", "rollout_is_weight_mean")


@pytest.fixture(scope="module", params=sorted(RUNS))
def deepspeed_run(request, tmp_path_factory):
    from openrlhf_gmpo.openrlhf_plugin.actor import GMPOPolicyModelActor

    loss, zero_stage, clip = RUNS[request.param]

    tmp = tmp_path_factory.mktemp("deepspeed_actor")
    pretrain = str(tmp / "pretrain")
    hm.tiny_hf_moe().save_pretrained(pretrain)
    args = helpers_plugin.dry_run(
        "--actor.model_name_or_path", pretrain, "--actor.num_gpus_per_node", "2",
        "--actor.policy_loss_type", loss, "--actor.eps_clip_low_high", str(clip), str(clip),
        *helpers_plugin.SEQUENCE_ADVANTAGES, "--rollout.batch_size", "2", "--train.batch_size", "4",
        "--train.micro_batch_size", "1", "--actor.adam.lr", str(LR), "--actor.lr_scheduler", "constant",
        "--actor.max_norm", str(MAX_NORM), "--ds.attn_implementation", "sdpa", "--ds.enable_sleep",
        "--ds.zero_stage", str(zero_stage),
        "--algo.advantage.is_correction_level", "seq", "--algo.advantage.is_correction_threshold", str(IS_CAP),
        "--ckpt.path", str(tmp / "ckpt"), "--ckpt.output_dir", str(tmp / "hf_out"),
    ).args  # fmt: skip
    env = ha.cpu_worker_env("deepspeed")
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    try:
        # The launcher's actor class as RayActorGroup starts it, with CPUs for the GPU this machine lacks.
        actor_class = GMPOPolicyModelActor.options(num_gpus=0, num_cpus=1)
        actors = ha.start_actors(actor_class, args, pretrain)
        start = ha.deepspeed_master_weights(actors)
        old = ha.forward(actors)
        first = ha.step(actors, old, rollout=old)
        after_first = ha.deepspeed_master_weights(actors)
        new = ha.forward(actors)
        second = ha.step(actors, old, rollout=_rollout(old))  # the same old-policy log-probs: ratios away from 1
        results = dict(start=start, old=old, first=first, after_first=after_first, new=new, second=second)
        results |= dict(loss=CLI_TO_REGISTRY[loss], clip=clip)
    finally:
        ray.shutdown()
    return results


def _rollout(old):
    """vLLM's log-probs in step 2: each sequence's valid tokens ROLLOUT_SHIFT below the old policy's."""
    shifts = ROLLOUT_SHIFT.view(2, 2)  # per rank, per row
    return [chunk - shift[:, None] * mask for (chunk, mask), shift in zip(_chunks(torch.cat(old)), shifts, strict=True)]


def _bf16_reference(run):
    """The tiny model as OpenRLHF loads it (bf16 weights), in fp32, and the run's loss gradient over the whole batch at
    the rollout policy (global mean over the 4 sequences, as on one rank), clipped to MAX_NORM; and the norm before."""
    from openrlhf_gmpo.losses import compute_policy_loss

    model = hm.tiny_hf_moe()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    batch = hm.policy_batch()
    log_probs = hm.hf_action_log_probs(model, batch)
    loss, _ = compute_policy_loss(
        run["loss"], log_probs, log_probs.detach(), batch["advantages"], batch["action_mask"],
        clip_eps_low=run["clip"], clip_eps_high=run["clip"], global_batch_size=4, dp_size=1,
    )  # fmt: skip
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item()
    return model, log_probs.detach(), grad_norm


def _chunks(tensor):
    """The batch's rows as the two ranks' chunks (rows 0-1, 2-3), and each chunk's action mask."""
    mask = hm.policy_batch()["action_mask"]
    return [(tensor[2 * r : 2 * r + 2], mask[2 * r : 2 * r + 2]) for r in range(2)]


def test_forward_is_the_bf16_models_log_probs(deepspeed_run):
    _, reference, _ = _bf16_reference(deepspeed_run)
    for rank, (expected, mask) in enumerate(_chunks(reference)):
        actor = deepspeed_run["old"][rank]
        assert actor.shape == (2, 6)
        # bf16 activations against the fp32 forward of the same weights
        torch.testing.assert_close(actor[mask], expected[mask], atol=3e-2, rtol=0)


def test_first_step_reports_our_loss_at_ratio_one(deepspeed_run):
    for status in deepspeed_run["first"]:
        # Every micro-batch is one sequence i, loss_i = -A_i * exp(0) * dp_size / (global_batch_size / gas)
        # = -A_i * 2 / (4 / 2) = -A_i (OpenRLHF pre-divides the step's sequence count by gas for DeepSpeed's 1/gas).
        # OpenRLHF logs the token-weighted mean: advantages 1.0, -0.5, 0.7, -1.2 over 6, 6, 4, 6 tokens:
        # -(6 - 3 + 2.8 - 7.2) / 22 = 1.4 / 22.
        assert status["policy_loss"] == pytest.approx(1.4 / 22, rel=1e-5)
        assert status["gmpo/token_ratio_min"] == status["gmpo/token_ratio_max"] == pytest.approx(1.0, abs=1e-6)
        assert status["gmpo/clip_frac_low"] == status["gmpo/clip_frac_high"] == status["ppo_clip_ratio"] == 0.0
        assert status["vllm_kl"] == status["is_filter_ratio"] == 0.0
        assert status["gmpo/rollout_is_weight_mean"] == pytest.approx(1.0, abs=1e-6)
        assert status["actor_lr"] == LR


def test_first_step_is_adams_first_step_on_the_global_gradient(deepspeed_run):
    model, _, grad_norm = _bf16_reference(deepspeed_run)
    for status in deepspeed_run["first"]:
        # bf16 forward and backward against fp32: the norm of the same global-mean gradient, before clipping
        assert status["actor_grad_norm"] == pytest.approx(grad_norm, rel=2e-2)
    assert grad_norm > MAX_NORM
    start, after = deepspeed_run["start"], deepspeed_run["after_first"]
    deltas, grads, masters = [], [], []
    for name, param in model.named_parameters():
        torch.testing.assert_close(start[name], param.detach(), atol=0, rtol=0)  # fp32 masters of bf16 weights
        deltas.append((after[name] - start[name]).flatten())
        masters.append(start[name].flatten())
        grads.append(param.grad.flatten())
    delta, grad = torch.cat(deltas), torch.cat(grads)
    # Adam's first step moves each weight by lr * g / (|g| + eps): by lr against the gradient's sign, by nothing
    # where the gradient is 0 (embedding rows of tokens not in the batch), never by more than lr.
    assert delta[grad == 0].abs().max() == 0
    # (`after - start` of an fp32 master weight w can exceed lr by up to one unit in the last place of w)
    assert (delta.abs() <= LR + torch.finfo(torch.float32).eps * torch.cat(masters).abs()).all()
    # bf16 gradients flip the sign of the smallest fp32 ones: compare where |g| > 1e-6 (20,900 of 22,976 weights).
    # Measured: 99.82 % moved against the reference gradient's sign (a negated loss: ~0.2 %), 99.6 % by lr +- 1 %.
    large = grad.abs() > 1e-6
    assert large.sum() > 0.8 * grad.numel()
    against = (torch.sign(delta[large]) == -torch.sign(grad[large])).float().mean().item()
    by_lr = ((delta[large].abs() - LR).abs() <= 0.01 * LR).float().mean().item()
    print(f"measured: {against:.4f} of the weights moved against the gradient, {by_lr:.4f} by lr")
    assert against >= 0.995 and by_lr >= 0.99


def test_second_step_logs_our_loss_and_metrics_over_micro_batches_and_ranks(deepspeed_run):
    from openrlhf_gmpo.losses import compute_policy_loss

    run, batch = deepspeed_run, hm.policy_batch()
    new, old = torch.cat(run["new"]), torch.cat(run["old"])
    rollout = torch.cat(_rollout(run["old"]))
    # OpenRLHF averages each micro-batch's (one sequence's) value, weighted by its tokens or as one sample; a loss
    # that clips whole sequences reports sequence clip fractions, weighted as samples
    tokens = batch["action_mask"].sum(-1).float()
    sequence_clip = clip_level(run["loss"]) == "sequence"
    by_sample = SEQUENCE_METRICS + (("clip_frac_low", "clip_frac_high") if sequence_clip else ())
    losses, per_sequence = [], []
    for i in range(4):
        loss, metrics = compute_policy_loss(
            run["loss"], new[[i]], old[[i]], batch["advantages"][[i]], batch["action_mask"][[i]],
            clip_eps_low=run["clip"], clip_eps_high=run["clip"], global_batch_size=2, dp_size=2,
            rollout_log_probs=rollout[[i]], rollout_is_cap=IS_CAP,
        )  # fmt: skip
        losses.append(loss)
        per_sequence.append(metrics)
    expected = {}
    for key in TOKEN_METRICS + SEQUENCE_METRICS:
        weight = torch.ones(4) if key in by_sample else tokens
        expected[key] = sum(weight[i] * per_sequence[i][key] for i in range(4)) / weight.sum()
    expected_loss = sum(tokens[i] * losses[i] for i in range(4)) / tokens.sum()
    for status in deepspeed_run["second"]:
        # The training forward's log-probs are the forward pass's (the same bf16 model): measured differences of
        # the logged values <= 6e-8.
        for key, value in expected.items():
            assert status[f"gmpo/{key}"] == pytest.approx(value.item(), abs=1e-6), key
        assert status["policy_loss"] == pytest.approx(expected_loss.item(), abs=1e-6)
        assert status["ppo_clip_ratio"] == pytest.approx(status["gmpo/clip_frac_low"] + status["gmpo/clip_frac_high"])
        if sequence_clip:  # one sequence of four clipped, counted as a sample (by tokens it would be 4 / 22)
            assert status["ppo_clip_ratio"] == pytest.approx(1 / 4)
        # vLLM's log-probs sit 0, 0.005, 0.02, 0.05 below the old policy's over 6, 6, 4, 6 tokens: OpenRLHF logs the
        # token-weighted mean difference, -(0 + 0.03 + 0.08 + 0.3) / 22, and the token-weighted share of sequences
        # whose weight e^shift hit the cap 1.01 (shift > 0.00995: the last two), 10 / 22.
        assert status["vllm_kl"] == pytest.approx(-0.41 / 22, abs=1e-6)
        assert status["is_filter_ratio"] == pytest.approx(10 / 22, abs=1e-6)
        # the weights themselves, one per sequence: (1 + e^0.005 + 1.01 + 1.01) / 4
        assert status["gmpo/rollout_is_weight_mean"] == pytest.approx((1 + math.exp(0.005) + 1.01 + 1.01) / 4, abs=1e-6)
    measured = deepspeed_run["second"][0]
    print("measured:", {k: round(v, 4) for k, v in measured.items() if k.startswith("gmpo/")})
    assert measured["gmpo/token_ratio_max"] > 1 + 1e-3 and measured["gmpo/token_ratio_min"] < 1 - 1e-3
    assert measured["gmpo/clip_frac_low"] + measured["gmpo/clip_frac_high"] > 0  # the clip acted
