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
