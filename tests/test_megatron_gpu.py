"""The megatron backend on one CUDA GPU in bf16, on the CountDown 200M MoE config (top-1 of 8 experts, tied
embeddings). Skipped without CUDA; run on the GPU box: `pytest tests/test_megatron_gpu.py -m gpu`.
Written without a GPU to run them on: their first run is on the coordinator's H100."""

import helpers_megatron as hm
import pytest
import torch

pytestmark = pytest.mark.gpu

VOCAB = 64
BATCH, LENGTH, RESPONSE = 8, 96, 48
# What the GMPO-step test records per step (record_property: gpu_measured.log of tools/gpu_session.sh; docs/megatron.md)
STEP_METRICS = ("policy_loss", "grad_norm", "token_ratio_min", "token_ratio_max")


@pytest.fixture(scope="module")
def single_gpu_megatron():
    from openrlhf_gmpo.megatron.parallel import ParallelSizes, destroy_parallel_state, initialize_parallel_state

    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{hm.free_port()}", rank=0, world_size=1)
    sizes = ParallelSizes(1)
    initialize_parallel_state(sizes)
    yield sizes
    destroy_parallel_state()
    torch.distributed.destroy_process_group()


def _countdown_200m():
    from openrlhf_gmpo.countdown.model import build_model

    return build_model("200m", VOCAB, seed=0)


def _batch():
    g = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)
    attention_mask = torch.ones(BATCH, LENGTH, dtype=torch.bool)
    attention_mask[::2, :7] = False  # every other row left-padded
    return sequences.cuda(), attention_mask.cuda()


def _megatron_200m(hf, sizes, **kwargs):
    from openrlhf_gmpo.megatron.model import build_gpt_model
    from openrlhf_gmpo.megatron.weights import load_hf_weights

    model = build_gpt_model(hf.config, sizes, params_dtype=torch.bfloat16, **kwargs)
    load_hf_weights(model, hf.state_dict(), hf.config)
    return model


def test_bf16_log_probs_match_hf_as_closely_as_hf_bf16_matches_fp32(single_gpu_megatron, record_property):
    from openrlhf_gmpo.countdown.model import to_low_precision
    from openrlhf_gmpo.megatron.logprobs import token_log_probs

    hf = _countdown_200m().cuda()
    sequences, mask = _batch()
    valid = hm.valid_prediction_mask(mask)
    exact = hm.hf_token_log_probs(hf, sequences, mask)[valid]  # fp32 HF: the reference
    # RoPE frequencies stay fp32, as from_pretrained(dtype=bf16) and megatron keep them
    hf_bf16 = hm.hf_token_log_probs(to_low_precision(hf, torch.bfloat16), sequences, mask)[valid]
    model = _megatron_200m(_countdown_200m(), single_gpu_megatron).eval()
    with torch.no_grad():
        ours = token_log_probs(model, sequences, mask)[valid]
    hf_error = (hf_bf16.float() - exact).abs().mean().item()
    our_error = (ours - exact).abs().mean().item()
    record_property("logprob_mean_abs_error_megatron_bf16", our_error)  # docs/megatron.md records these
    record_property("logprob_mean_abs_error_hf_bf16", hf_error)
    record_property("logprob_max_abs_error_megatron_bf16", (ours - exact).abs().max().item())
    # Both are bf16 roundings of the same function; ours may differ in summation order, not be much worse.
    assert our_error <= 1.5 * hf_error + 1e-3, (our_error, hf_error)


def test_grouped_experts_replace_sequential_mlp_on_cuda_without_te(single_gpu_megatron):
    from openrlhf_gmpo.megatron.model import has_transformer_engine

    if has_transformer_engine():
        pytest.skip("Transformer Engine is installed: its grouped GEMM is used instead")
    from openrlhf_gmpo.megatron.grouped_experts import GroupedExperts

    model = _megatron_200m(_countdown_200m(), single_gpu_megatron)
    assert isinstance(model.decoder.layers[0].mlp.experts, GroupedExperts)


@pytest.mark.parametrize("recompute", [False, True])
def test_gmpo_steps_raise_the_advantage_weighted_log_probs(single_gpu_megatron, recompute, record_property):
    from openrlhf_gmpo.megatron.logprobs import token_log_probs
    from openrlhf_gmpo.megatron.train import (
        OptimizerOptions,
        PolicyMicroBatch,
        build_optimizer,
        policy_update,
        wrap_ddp,
    )

    model = _megatron_200m(_countdown_200m(), single_gpu_megatron, recompute=recompute)
    ddp = wrap_ddp(model)
    optimizer = build_optimizer(ddp, OptimizerOptions(lr=1e-5, clip_grad=1.0))  # megatron's distributed Adam
    sequences, mask = _batch()
    action_mask = torch.ones(BATCH, RESPONSE, dtype=torch.bool, device="cuda")
    advantages = torch.tensor([1.0, -1.0] * (BATCH // 2), device="cuda")

    def response_log_probs():
        with torch.no_grad():
            return token_log_probs(ddp, sequences, mask)[:, -RESPONSE:].mean(-1)

    before = response_log_probs()
    old = None
    for step in range(3):
        with torch.no_grad():
            old = token_log_probs(ddp, sequences, mask)[:, -RESPONSE:]
        micro_batches = [
            PolicyMicroBatch(sequences[i : i + 2], mask[i : i + 2], action_mask[i : i + 2], old[i : i + 2],
                             advantages[i : i + 2])
            for i in range(0, BATCH, 2)
        ]  # fmt: skip
        metrics = policy_update(
            ddp, optimizer, micro_batches, loss_name="gmpo", clip_eps_low=0.4, clip_eps_high=0.4,
            global_batch_size=BATCH, dp_size=1,
        )  # fmt: skip
        assert metrics["update_skipped"] == 0.0 and metrics["grad_norm"] > 0
        record_property(f"step{step}", {key: metrics[key] for key in STEP_METRICS})
    # The policy-gradient objective on this batch, sum_i A_i * mean_t log p: GMPO steps must raise it (sequences
    # share all parameters, so single sequences may move against their advantage; the weighted sum may not).
    objective_before = (advantages * before).sum().item()
    objective_after = (advantages * response_log_probs()).sum().item()
    record_property("objective_before_after", (objective_before, objective_after))
    assert objective_after > objective_before, (objective_before, objective_after)


def test_megatron_optimizer_resumes_a_checkpoint_on_cuda(single_gpu_megatron, tmp_path, record_property):
    """The actor's checkpoint resume with megatron's distributed optimizer on real CUDA tensors (tiny MoE, bf16):
    megatron-core 0.19.2's own load failed here (training_state.py). Bit-exactness is checked on CPU with CUDA
    tensors emulated (test_megatron_gpu_optimizer.py); on the GPU the kernels may reorder sums, so the third step's
    agreement is recorded and only bounded by how far that step moved the weights."""
    import helpers_megatron_resume

    result = helpers_megatron_resume.resume_check(single_gpu_megatron, [0, 1, 2, 3], str(tmp_path), device="cuda")
    keys = ("loaded_difference", "third_step_difference", "third_step_moved", "grad_norms", "step_counters")
    record_property("resume_on_cuda", {key: result[key] for key in keys})
    assert set(result["optimizers"]) == {"DistributedOptimizer"} and result["dtypes"] == {torch.bfloat16}
    assert result["client_states"] == ({"episode": 2}, {"episode": 3})
    assert result["loaded_difference"] == 0.0
    assert result["step_counters"] == [3.0] and result["step_counters_distinct"] and result["step_counters_on_host"]
    assert result["grad_norms"][1] == pytest.approx(result["grad_norms"][0], rel=1e-3)
    assert result["third_step_difference"] < result["third_step_moved"]


def test_stability_engine_scores_like_hf_in_bf16_and_takes_a_gmpo_step(single_gpu_megatron, record_property):
    """`--engine megatron` on the 200m preset's model: bf16 log-probs as close to fp32 HF as HFEngine's, one GMPO
    train_step with the harness's optimizer, and an exact fp32 model-state round trip through the master weights."""
    import math

    from openrlhf_gmpo.countdown.model import build_model
    from openrlhf_gmpo.countdown.tokenizer import build_tokenizer
    from openrlhf_gmpo.losses import compute_policy_loss
    from openrlhf_gmpo.stability.engine import make_engine

    tokenizer = build_tokenizer()
    kwargs = dict(model_size="200m", vocab_size=len(tokenizer), seed=0, device="cuda",
                  eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)  # fmt: skip
    engine, hf = make_engine("megatron", **kwargs), make_engine("hf", **kwargs)  # the fixture's process groups
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(tokenizer), (20 + 3 * i,), generator=g).tolist() for i in range(BATCH)]
    batch = hf.generate(prompts, max_new_tokens=RESPONSE, greedy=False, seed=0)
    mask = batch.action_mask.bool()
    exact_model = build_model("200m", len(tokenizer), seed=0).cuda()  # fp32 HF: the reference
    exact = hm.hf_token_log_probs(exact_model, batch.input_ids, batch.attention_mask)[:, batch.prompt_len - 1 :]
    hf_error = (hf.score(batch).log_probs - exact)[mask].abs().mean().item()
    our_error = (engine.score(batch).log_probs - exact)[mask].abs().mean().item()
    record_property("logprob_mean_abs_error_megatron_engine_bf16", our_error)
    record_property("logprob_mean_abs_error_hf_engine_bf16", hf_error)
    # As in the first test: both are bf16 roundings of the same function, ours no worse than 1.5x HF's.
    assert our_error <= 1.5 * hf_error + 1e-3, (our_error, hf_error)

    old = engine.score(batch).log_probs
    advantages = torch.tensor([1.0, -1.0] * (BATCH // 2), device="cuda")

    def loss_fn(log_probs):
        return compute_policy_loss(
            "gmpo", log_probs, old, advantages, batch.action_mask, clip_eps_low=0.4, clip_eps_high=0.4
        )

    def objective():  # sum_i A_i * mean_t log p, which a policy-gradient step must raise
        log_probs = engine.score(batch).log_probs
        return (advantages * (log_probs * mask).sum(-1) / mask.sum(-1)).sum().item()

    # lr 3e-4: one Adam step moves weights of scale 0.02 by ~2 bf16 ulps, so the bf16 parameters do change.
    for e in (engine, hf):
        e.reset_optimizer(3e-4, 0.0, 1.0)
    before = objective()
    grad_norm, metrics = engine.train_step(batch, loss_fn)
    hf_grad_norm, _ = hf.train_step(batch, loss_fn)
    record_property("grad_norm_megatron_hf", (grad_norm, hf_grad_norm))
    assert math.isfinite(metrics["loss"]) and grad_norm > 0
    # Different bf16 kernels (and megatron's fp32 router) round differently; a wrong gradient is off by far more.
    assert grad_norm == pytest.approx(hf_grad_norm, rel=0.1), (grad_norm, hf_grad_norm)
    assert objective() > before

    state = engine.model_state()  # from the fp32 master weights
    engine.load_model_state(state)
    after = engine.model_state()
    assert all(torch.equal(after[name], state[name]) for name in state)


def test_megatron_optimizer_decays_matrices_only(single_gpu_megatron):
    from openrlhf_gmpo.megatron.train import OptimizerOptions, build_optimizer, wrap_ddp

    model = _megatron_200m(_countdown_200m(), single_gpu_megatron)
    optimizer = build_optimizer(wrap_ddp(model), OptimizerOptions(weight_decay=0.1))
    # megatron groups biases and 1-D weights (norms) with wd_mult 0; only its own scheduler would apply that, so
    # build_optimizer does: without it every group would decay at 0.1.
    multipliers = sorted({group["wd_mult"] for group in optimizer.param_groups})
    assert multipliers == [0.0, 1.0]
    for group in optimizer.param_groups:
        assert group["weight_decay"] == 0.1 * group["wd_mult"]
