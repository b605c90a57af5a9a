"""Two policy actors on a local Ray cluster, driven as OpenRLHF's PPO trainer drives its actor group.

Shared by the megatron actor's test and the DeepSpeed plugin actor's test: the same start-up (rank 0 first, the
other rank joining at its address, as `RayActorGroup` does), the same data chunks (`helpers_megatron.policy_batch`,
2 sequences per rank) and the same PPO step under `--ds.enable_sleep` (reload, fit, offload).
"""

import helpers_megatron as hm
import helpers_stubs
import ray

# What each backend's Ray workers need on CPU (stub_site/sitecustomize.py installs it at start-up): megatron-core's
# CUDA shims; or the CUDA device calls of OpenRLHF's DeepSpeed actor, with flash-attn's Triton cross-entropy run by
# Triton's interpreter.
_BACKEND_ENV = {
    "megatron": {"GMPO_TEST_MEGATRON_CPU_SHIMS": "1"},
    "deepspeed": {"GMPO_TEST_DEEPSPEED_CPU_SHIMS": "1", "TRITON_INTERPRET": "1"},
}


def cpu_worker_env(backend: str, hide_gpus: bool = True) -> dict[str, str]:
    """env_vars for a Ray cluster whose workers run `backend`'s policy actors on CPU: the import stubs, package and
    test helpers on PYTHONPATH, one thread each, the backend's shims, and (`hide_gpus`) no GPU visible even on a GPU
    machine. A cluster that advertises fake GPUs cannot hide them: Ray maps its GPU ids through CUDA_VISIBLE_DEVICES."""
    env = {"PYTHONPATH": helpers_stubs.ray_worker_pythonpath(), "OMP_NUM_THREADS": "1"}
    if hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env | _BACKEND_ENV[backend]


# One GMPO step over policy_batch() per `fit` (4 samples, micro-batches of 1), as the HF reference takes it.
STEP_LR, STEP_MAX_NORM = 1e-3, 0.1


def megatron_args(pretrain: str, gpus: int, *flags: str):
    """The launcher's arguments (OpenRLHF's parser, dry run) for `gpus` megatron policy actors taking that step;
    `flags` add the layout and the rest."""
    import helpers_plugin

    return helpers_plugin.dry_run(
        "--backend", "megatron", "--actor.model_name_or_path", pretrain, "--actor.num_gpus_per_node", str(gpus),
        "--actor.policy_loss_type", "gmpo", "--actor.eps_clip_low_high", "0.4", "0.4",
        "--algo.advantage.estimator", "group_norm", "--algo.kl.init_coef", "0",
        "--rollout.batch_size", "2", "--rollout.n_samples_per_prompt", "2", "--train.batch_size", "4",
        "--train.micro_batch_size", "1", "--actor.adam.lr", str(STEP_LR), "--actor.lr_scheduler", "constant",
        "--actor.max_norm", str(STEP_MAX_NORM), *flags,
    ).args  # fmt: skip


def start_actors(actor_class, args, pretrain, count: int = 2):
    """Create `count` actors of `actor_class` (a Ray actor class; their workers get the backend's CPU shims at
    start-up, `cpu_worker_env`), then OpenRLHF's `init_model_from_pretrained` on all with the launcher's strategy."""
    from openrlhf.utils.utils import get_strategy

    master = actor_class.remote(count, 0, None, None)
    address, port = ray.get(master.get_master_addr_port.remote())
    actors = [master] + [actor_class.remote(count, rank, address, port) for rank in range(1, count)]
    strategy = get_strategy(args)
    ray.get([a.init_model_from_pretrained.remote(strategy, pretrain, max_steps=1) for a in actors], timeout=300)
    return actors


def forward(actors):
    """Each rank's log-probs of its chunk of `policy_batch()`, through `execute_batch("forward", ...)`."""
    refs = [a.execute_batch.remote("forward", hm.forward_chunk(rank), 0, 1) for rank, a in enumerate(actors)]
    return [result[0] for result in ray.get(refs, timeout=120)]


def step(actors, old, rollout=None):
    """One PPO step on each rank's chunk with old-policy log-probs `old` (and vLLM's, `rollout`, when given; one
    tensor per rank each); returns the statuses."""
    rollout = rollout or [None] * len(actors)
    experiences = [hm.experience_for_rank(rank, old[rank], rollout[rank]) for rank in range(len(actors))]
    ray.get([a.append.remote(e) for a, e in zip(actors, experiences, strict=True)])
    return sleeping_fit(actors)


def sleeping_fit(actors):
    """OpenRLHF's PPO step under --ds.enable_sleep: reload, fit, offload."""
    ray.get([a.reload_states.remote() for a in actors])
    status = ray.get([a.fit.remote(kl_ctl=0) for a in actors], timeout=120)
    ray.get([a.offload_states.remote() for a in actors])
    return status


def uneven_forward(actors):
    """OpenRLHF's ceil-sized chunks can leave a rank fewer micro-batches, or none: rank 0 gets its two rows as two
    micro-batches, rank 1 nothing. Each forward is a collective (EP's all-to-all, PP's stages), so this hangs unless
    the ranks even out."""
    chunk = hm.forward_chunk(0)
    two = {key: [rows[0][:1], rows[0][1:]] for key, rows in chunk.items()}
    none = {key: [] for key in chunk}
    refs = [actors[0].execute_batch.remote("forward", two, 0, 2), actors[1].execute_batch.remote("forward", none, 0, 0)]
    return ray.get(refs, timeout=120)


def hf_step_reference(make_hf, lr: float, max_norm: float):
    """One GMPO step on all of `policy_batch()` in one HF process, old policy = the initial weights (ratio 1 at the
    step): (old log-probs, grad norm, state after, log-probs after)."""
    import torch

    batch = hm.policy_batch()
    model = make_hf()
    with torch.no_grad():
        old = hm.hf_action_log_probs(model, batch)
    grad_norm, state = hm.hf_reference_update(model, batch, old_log_probs=old, lr=lr, clip_grad=max_norm)
    with torch.no_grad():
        new = hm.hf_action_log_probs(model, batch)
    return old, grad_norm, state, new


def rank_rows(rank):
    """The rows of `policy_batch()` in rank `rank`'s chunk (2 actors), and their action mask."""
    rows = [2 * rank, 2 * rank + 1]
    return rows, hm.policy_batch()["action_mask"][rows]


def check_forward(per_rank_log_probs, reference_old, uneven=None) -> None:
    """Each rank's forward returned the HF log-probs of its own two rows; with `uneven` (uneven_forward's results),
    rank 0's two one-row forwards equal its even one and rank 1 returned nothing."""
    import torch

    for rank, log_probs in enumerate(per_rank_log_probs):
        rows, mask = rank_rows(rank)
        assert log_probs.shape == (2, 6)
        torch.testing.assert_close(log_probs[mask], reference_old[rows][mask], atol=1e-4, rtol=0)
    if uneven is not None:
        first, second = uneven[0]
        assert uneven[1] == []
        _, mask = rank_rows(0)
        torch.testing.assert_close(torch.cat([first, second])[mask], per_rank_log_probs[0][mask], atol=1e-5, rtol=0)


def check_step(statuses, old, new, reference_grad_norm, reference_new) -> None:
    """`fit` took the HF step over the whole batch: every rank reports the global (clipped) norm, ratio 1 at the step
    and the mean reward of all chunks (the advantages 1.0, -0.5, 0.7, -1.2: 0), and its rows' log-probs after the
    step (`new`, against `old` before it) are the HF model's after the same step."""
    import pytest
    import torch

    assert reference_grad_norm > STEP_MAX_NORM  # the step clips
    for rank, status in enumerate(statuses):
        assert status["actor_grad_norm"] == pytest.approx(reference_grad_norm, rel=1e-4)
        assert status["actor_lr"] == STEP_LR
        assert status["seq_ratio_min"] == pytest.approx(1.0, abs=1e-5)
        assert status["reward"] == pytest.approx(0.0, abs=1e-6)
        rows, mask = rank_rows(rank)
        torch.testing.assert_close(new[rank][mask], reference_new[rows][mask], atol=1e-4, rtol=0)
        assert (new[rank][mask] - old[rank][mask]).abs().max() > 1e-3  # the step moved


def check_saved_model(path, reference_state) -> None:
    """`save_model` wrote an HF checkpoint that loads with `from_pretrained` and holds `reference_state`."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    saved = Qwen3MoeForCausalLM.from_pretrained(str(path), dtype=torch.float32).state_dict()
    assert saved.keys() == reference_state.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, reference_state[name], atol=1e-5, rtol=0, msg=name)


def deepspeed_master_weights(actors) -> dict:
    """The fp32 master weights of OpenRLHF's DeepSpeed actors, by HF parameter name (gathered over the ZeRO
    partitions, a collective: every rank takes part). Under --ds.enable_sleep the masters are offloaded between
    steps, so the actors are woken for the read and put back to sleep."""
    ray.get([a.reload_states.remote() for a in actors])
    weights = ray.get([a.__ray_call__.remote(_master_weights) for a in actors])[0]
    ray.get([a.offload_states.remote() for a in actors])
    return weights


def _master_weights(actor) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    engine = actor.actor.model
    return {name: safe_get_full_fp32_param(p).clone() for name, p in engine.module.named_parameters()}
