"""`MegatronPolicyActor`: OpenRLHF 0.11.2's policy actor, trained with megatron-core (expert parallelism) instead of
DeepSpeed. A plain class; the launcher wraps it with `ray.remote(num_gpus=1)` and OpenRLHF's RayActorGroup creates one
per GPU with `(world_size, rank, master_addr, master_port)`.

What OpenRLHF's PPO trainer calls, and what each does here:
- `init_model_from_pretrained(strategy, pretrain, max_steps, vllm_engines)`: process groups, this rank's share of the
  model read lazily from the HF checkpoint, DDP, optimizer, the weight-sync group with vLLM.
- `forward(sequences, action_mask, attention_mask, ...)` (through `execute_batch`, which evens out the number of
  forwards across ranks): old-policy log-probs; with routing replay it also records each sequence's experts.
- `append(experience)`, `fit(kl_ctl)`: buffer this rank's experiences, then run `train.max_epochs` passes of optimizer
  steps over them; returns the metrics dict the trainer logs.
- `broadcast_to_vllm()`, `save_model()`, `save_checkpoint(tag, ...)`, `get_checkpoint_states()`, `empty_cache()`,
  `offload_states()` / `reload_states()` (for `--ds.enable_sleep`: what they free is GPU memory).

Data: OpenRLHF sends one chunk to each run of `ds.tensor_parallel_size` (= megatron's TP) consecutive actors: one
per TP group. With pp > 1 the stages of a replica are not consecutive ranks (megatron orders pipeline ranks last) and
get different chunks: every stage works on its replica's chunks pooled (`pipeline.gather_over_pipeline`), and
`forward` returns each rank the rows of its own chunk.
"""

from __future__ import annotations

import datetime
import os
import shutil

import torch
from openrlhf.trainer.ray.launcher import BaseModelActor

from openrlhf_gmpo.megatron import checkpoints, pipeline, routing_replay, training_state, vllm_sync
from openrlhf_gmpo.megatron.hf_checkpoint import SafetensorsCheckpoint, local_checkpoint_dir, save_hf_checkpoint
from openrlhf_gmpo.megatron.model import MoEOptions, build_gpt_model, is_moe_config
from openrlhf_gmpo.megatron.parallel import (
    ParallelSizes,
    check_openrlhf_chunking,
    initialize_parallel_state,
    sizes_for_hf_config,
)
from openrlhf_gmpo.megatron.samples import attach_routing, left_pad_collate, remember_routing
from openrlhf_gmpo.megatron.train import (
    LRSchedule,
    OptimizerOptions,
    PolicyMicroBatch,
    action_log_probs,
    build_optimizer,
    policy_update,
    wrap_ddp,
)
from openrlhf_gmpo.megatron.weights import iter_hf_weights, load_hf_weights
from openrlhf_gmpo.openrlhf_plugin.loss_adapter import CLI_TO_REGISTRY


class MegatronPolicyActor(BaseModelActor):
    def init_model_from_pretrained(self, strategy, pretrain, max_steps=None, vllm_engines=None):
        from transformers import AutoConfig, AutoTokenizer

        if not max_steps:
            raise ValueError(f"max_steps={max_steps!r}: the learning-rate schedule needs the run's optimizer steps")
        self.strategy = strategy
        self.args = args = strategy.args
        self.vllm_engines = vllm_engines
        self.device = _init_torch_distributed()
        pretrain = self.pretrain_dir = local_checkpoint_dir(pretrain)  # a Hub id becomes its cached snapshot
        self.hf_config = AutoConfig.from_pretrained(pretrain)
        m = args.megatron
        world = torch.distributed.get_world_size()
        self.sizes = sizes_for_hf_config(self.hf_config, ParallelSizes(world, tp=m.tp, pp=m.pp, ep=m.ep, etp=m.etp))
        initialize_parallel_state(self.sizes, seed=args.train.seed)
        check_openrlhf_chunking(self.sizes)
        self.routing_replay = bool(m.routing_replay) and is_moe_config(self.hf_config)
        model = build_gpt_model(
            self.hf_config,
            self.sizes,
            moe=MoEOptions(router_dtype=m.router_dtype, aux_loss_coef=m.aux_loss_coef, routing_replay=m.routing_replay),
            params_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
            recompute=m.recompute,
        )
        load_hf_weights(model, SafetensorsCheckpoint(pretrain), self.hf_config)
        self.model = wrap_ddp(model, fp32_grads=not m.bf16_grads)
        adam = args.actor.adam
        self.optimizer = build_optimizer(
            self.model,
            OptimizerOptions(
                lr=adam.lr,
                weight_decay=adam.weight_decay,
                betas=tuple(adam.betas),
                eps=adam.eps,
                clip_grad=args.actor.max_norm,
            ),
        )
        self.lr_schedule = LRSchedule(
            self.optimizer,
            args.actor.lr_scheduler,
            adam.lr,
            total_steps=max_steps,
            warmup_ratio=args.actor.lr_warmup_ratio,
            min_lr_ratio=args.actor.min_lr_ratio,
        )
        self.tokenizer = AutoTokenizer.from_pretrained(pretrain)
        self.experiences, self.recorded_routing = [], {}
        self.checkpoint_states = self._load_checkpoint() if args.ckpt.load_enable else {}
        self._model_update_group = None
        if vllm_engines and not vllm_sync.use_cuda_ipc(args) and torch.distributed.get_rank() == 0:
            self._model_update_group = vllm_sync.init_broadcast_group(args, vllm_engines, self._get_free_port())
        if args.ds.enable_sleep:
            self.offload_states()  # as OpenRLHF's actor starts offloaded; the trainer reloads before use
        torch.distributed.barrier()

    # ---- experience ------------------------------------------------------------------------------------------------

    def forward(
        self, sequences, action_mask=None, attention_mask=None, packed_seq_lens=None, mm_train_inputs_list=None
    ):
        """Old-policy log-probs of the response tokens, (b, A) on CPU."""
        if packed_seq_lens is not None or mm_train_inputs_list:
            raise ValueError("the megatron backend takes padded text batches (no --ds.packing_samples, no images)")
        if self.sizes.pp > 1:
            return self._pipeline_log_probs(sequences, attention_mask.bool(), action_mask.shape[1])
        sequences, attention_mask = sequences.to(self.device), attention_mask.to(self.device).bool()
        recorded = []
        self.model.eval()
        with torch.no_grad():
            if self.routing_replay:
                with routing_replay.recording(attention_mask, into=recorded):
                    log_probs = self._log_probs(sequences, attention_mask, action_mask.shape[1])
                remember_routing(self.recorded_routing, sequences, attention_mask, recorded)
            else:
                log_probs = self._log_probs(sequences, attention_mask, action_mask.shape[1])
        self.model.train()
        return log_probs.cpu()

    def execute_batch(self, method_name: str, all_data, start_idx, end_idx):
        """OpenRLHF's, plus: every rank runs as many `forward`s as the busiest one.

        OpenRLHF splits a batch into ceil(n / actors)-sized chunks, so the last ranks can get fewer micro-batches
        (or none); with expert parallelism every forward is a collective (the all-to-all), and a rank that stopped
        early would leave the others waiting forever. The extra forwards run on a one-token batch and are dropped.
        """
        if method_name != "forward":
            return super().execute_batch(method_name, all_data, start_idx, end_idx)
        # The counts are agreed before any forward: collectives must come in the same order on every rank.
        mine = len(next(iter(all_data.values()))[start_idx:end_idx])
        busiest = torch.tensor([mine], device=self.device)
        torch.distributed.all_reduce(busiest, op=torch.distributed.ReduceOp.MAX)
        results = super().execute_batch(method_name, all_data, start_idx, end_idx)
        for _ in range(int(busiest.item()) - mine):
            self._padding_forward()
        return results

    def _padding_forward(self) -> None:
        token = torch.full((1, 2), self.tokenizer.eos_token_id or 0, dtype=torch.long)
        self.forward(token, action_mask=torch.ones(1, 1, dtype=torch.bool), attention_mask=torch.ones_like(token))

    def _pipeline_log_probs(self, sequences, attention_mask, num_actions):
        recorded = [] if self.routing_replay else None  # every pooled sequence's routing through this stage
        self.model.eval()
        log_probs = pipeline.pooled_log_probs(
            self.model,
            sequences,
            attention_mask,
            device=self.device,
            temperature=self.args.rollout.temperature,
            routing_into=recorded,
        )
        self.model.train()
        for ids, mask, per_sequence in recorded or []:
            remember_routing(self.recorded_routing, ids, mask, per_sequence)
        return log_probs[:, -num_actions:]

    def _log_probs(self, sequences, attention_mask, num_actions):
        temperature = self.args.rollout.temperature
        return action_log_probs(self.model, sequences, attention_mask, num_actions, temperature=temperature)

    def append(self, experience) -> None:
        self.experiences.append(experience)

    def _samples(self) -> list[dict]:
        """This replica's samples: the buffer, pooled over pipeline stages (the same list on each stage)."""
        samples = self._buffered_samples()
        if self.sizes.pp > 1:
            samples = [s for chunk in pipeline.gather_over_pipeline(samples) for s in chunk]
        if self.routing_replay:  # what this rank recorded: with pp > 1, its own stage's layers
            attach_routing(samples, self.recorded_routing)
        return samples

    def _buffered_samples(self) -> list[dict]:
        """This rank's buffer as per-sample dicts (OpenRLHF's advantages are per token; old = action_log_probs)."""
        samples = []
        for exp in self.experiences:
            for i in range(exp.sequences.shape[0]):
                # Rows copied, not viewed: a view pickles its whole batch's storage (pooling over pipeline stages).
                sample = {
                    "sequences": exp.sequences[i].clone(),
                    "attention_mask": exp.attention_mask[i].clone(),
                    "action_mask": exp.action_mask[i].clone(),
                    "old_log_probs": exp.action_log_probs[i].clone(),
                    "advantages": exp.advantages[i].clone(),
                    "rollout_log_probs": None if exp.rollout_log_probs is None else exp.rollout_log_probs[i].clone(),
                    "info": {k: v[i].clone() for k, v in exp.info.items() if torch.is_tensor(v) and v.dim() == 1},
                }
                samples.append(sample)
        return samples

    def _micro_batch(self, samples: list[dict]) -> PolicyMicroBatch:
        batch = {k: v.to(self.device) for k, v in left_pad_collate(samples).items()}
        return PolicyMicroBatch(
            sequences=batch["sequences"],
            attention_mask=batch["attention_mask"],
            action_mask=batch["action_mask"],
            old_log_probs=batch["old_log_probs"],
            advantages=batch["advantages"],
            rollout_log_probs=batch.get("rollout_log_probs"),
            routing=[s["routing"] for s in samples] if self.routing_replay else None,
        )

    # ---- training ------------------------------------------------------------------------------------------------

    def fit(self, kl_ctl: float = 0) -> dict:
        """`train.max_epochs` passes over the buffer in optimizer steps of `train.batch_size` samples (global)."""

        args = self.args
        samples = self._samples()
        per_rank_step = args.train.batch_size // self.sizes.dp
        # Every DP rank must take the same number of steps (DDP syncs each one); leftovers are dropped, like
        # OpenRLHF's drop_last.
        counts = torch.tensor([len(samples) // per_rank_step, len(samples)], device=self.device)
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MIN)
        steps, fewest_samples = counts.tolist()
        if steps == 0:
            return self._skip_update(samples, per_rank_step, with_info=fewest_samples > 0)
        low, high = args.actor.eps_clip_low_high
        micro = args.train.micro_batch_size
        history = []
        for epoch in range(args.train.max_epochs):
            # Same permutation on every rank of a DP replica: TP ranks must see the same samples in the same order.
            order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.train.seed + epoch))
            for step in range(steps):
                chunk = [samples[i] for i in order[step * per_rank_step : (step + 1) * per_rank_step].tolist()]
                micro_batches = [self._micro_batch(chunk[j : j + micro]) for j in range(0, len(chunk), micro)]
                metrics = policy_update(
                    self.model,
                    self.optimizer,
                    micro_batches,
                    loss_name=CLI_TO_REGISTRY[args.actor.policy_loss_type],
                    clip_eps_low=low,
                    clip_eps_high=high,
                    global_batch_size=args.train.batch_size,
                    dp_size=self.sizes.dp,
                    temperature=args.rollout.temperature,
                    rollout_is_cap=self._rollout_is_cap(),
                )
                metrics["actor_lr"] = self.lr_schedule.lr
                if not metrics["update_skipped"]:  # as megatron's and DeepSpeed's loops: a skipped step uses no rate
                    self.lr_schedule.step()
                history.append(metrics)
        status = _mean_over_steps(history)
        status["actor_grad_norm"] = history[-1]["grad_norm"]  # OpenRLHF reports the last step's norm
        status["actor_lr"] = history[-1]["actor_lr"]  # the last step's rate, as OpenRLHF reports it
        return self._end_round(status, samples)

    def _skip_update(self, samples: list[dict], per_rank_step: int, with_info: bool) -> dict:
        """No optimizer step when some rank holds less than one step's samples (e.g. the last, partial rollout of a
        pass over the prompts): OpenRLHF's DeepSpeed actor takes no step either, and stopping the job would lose the
        run. The rollout's metrics are still reported; `update_skipped` says what happened."""
        print(
            f"MegatronPolicyActor: no update this round: {len(samples)} samples on rank "
            f"{torch.distributed.get_rank()}, fewer than one optimizer step of {per_rank_step} "
            f"(train.batch_size {self.args.train.batch_size} / dp {self.sizes.dp}); they are dropped"
        )
        status = {"update_skipped": 1.0, "actor_lr": self.lr_schedule.lr}
        return self._end_round(status, samples if with_info else [])  # the same keys on every rank, or none

    def _end_round(self, status: dict, samples: list[dict]) -> dict:
        """`status` plus the rollout's info means over `samples`, averaged over the DP group; the buffer emptied."""
        from megatron.core import parallel_state as ps

        for key in samples[0]["info"] if samples else ():
            status[key] = torch.stack([s["info"][key].float() for s in samples]).mean().item()
        self.experiences, self.recorded_routing = [], {}
        return _mean_over_group(status, ps.get_data_parallel_group(), self.device)

    def _rollout_is_cap(self) -> float | None:
        """The rollout importance-weight cap, as our OpenRLHF loss adapter reads it; None when correction is off."""
        advantage = self.args.algo.advantage
        return advantage.is_correction_threshold[1] if advantage.is_correction_level != "off" else None

    # ---- weights out -----------------------------------------------------------------------------------------------

    def broadcast_to_vllm(self) -> None:
        """Every HF-named weight to the vLLM engines (see vllm_sync: NCCL broadcast, or CUDA IPC when colocated)."""
        vllm_sync.sync_weights(
            self.model.module,
            self.hf_config,
            self.vllm_engines,
            broadcast_group=self._model_update_group,
            cuda_ipc=vllm_sync.use_cuda_ipc(self.args),
            reset_prefix_cache=getattr(self.args.vllm, "enable_prefix_caching", False),
        )

    def offload_states(self) -> None:
        """Free GPU memory for colocated vLLM engines (--ds.enable_sleep); see training_state.offload."""
        training_state.offload(self.model, self.optimizer)

    def reload_states(self) -> None:
        training_state.reload(self.model, self.optimizer)

    def save_model(self) -> None:
        self._save_hf(self.args.ckpt.output_dir)

    def _save_hf(self, out_dir: str) -> None:
        rank0 = torch.distributed.get_rank() == 0
        weights = (
            (name, tensor)
            for name, tensor in iter_hf_weights(self.model.module, self.hf_config, "per_expert")
            if not (name == "lm_head.weight" and self.hf_config.tie_word_embeddings)
        )
        save_hf_checkpoint(weights, out_dir, write=rank0, dtype=torch.bfloat16 if torch.cuda.is_available() else None)
        if rank0:
            self.hf_config.save_pretrained(out_dir)
            self.tokenizer.save_pretrained(out_dir)
            # The model's recommended sampling settings, which OpenRLHF's save_pretrained keeps too.
            generation_config = os.path.join(self.pretrain_dir, "generation_config.json")
            if os.path.isfile(generation_config):
                shutil.copy(generation_config, out_dir)
        torch.distributed.barrier()

    # ---- checkpoints -----------------------------------------------------------------------------------------------

    def _checkpoint_dir(self, tag: str) -> str:
        return os.path.join(self.args.ckpt.path, "_actor", tag)

    def save_checkpoint(self, tag, client_states=None, metric_value=None, metric_key=None) -> None:
        """Per-rank model shard and optimizer state (resumable with the same parallel sizes; not with
        --ckpt.disable_ds, as in OpenRLHF), plus an HF copy with --ckpt.save_hf. megatron's distributed optimizer
        writes its sharded state through its own `save_parameter_state`. Old tags go by OpenRLHF's rules
        (`checkpoints`: max_num, max_mem, best tags kept)."""
        args = self.args
        if not args.ckpt.disable_ds:
            self._save_resumable(tag, client_states, metric_value, metric_key)
        if args.ckpt.save_hf:
            self._save_hf(os.path.join(args.ckpt.path, f"{tag}_hf"))
        torch.distributed.barrier()

    def _save_resumable(self, tag, client_states, metric_value, metric_key) -> None:
        path = self._checkpoint_dir(tag)
        os.makedirs(path, exist_ok=True)
        training_state.save(path, self.model.module, self.optimizer, self.lr_schedule, client_states)
        torch.distributed.barrier()  # every rank's file is written before the tag becomes "latest"
        if torch.distributed.get_rank() == 0:
            checkpoints.write_metric(path, metric_value, metric_key)
            actor_dir = os.path.dirname(path)
            with open(os.path.join(actor_dir, "latest"), "w") as f:
                f.write(tag)
            for deleted in checkpoints.prune(actor_dir, tag, self.args.ckpt.max_num, self.args.ckpt.max_mem):
                print(f"MegatronPolicyActor: deleted checkpoint {deleted} (--ckpt.max_num / --ckpt.max_mem)")

    def _load_checkpoint(self) -> dict:
        latest = os.path.join(self.args.ckpt.path, "_actor", "latest")
        if not os.path.exists(latest):
            return {}
        with open(latest) as f:
            path = self._checkpoint_dir(f.read().strip())
        return training_state.load(path, self.model.module, self.optimizer, self.lr_schedule)

    def get_checkpoint_states(self) -> dict:
        return self.checkpoint_states

    def empty_cache(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---- helpers ---------------------------------------------------------------------------------------------------------


def _init_torch_distributed() -> torch.device:
    """The default process group from the env BaseDistributedActor set (NCCL on GPU, gloo on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        # OpenRLHF's 60 minutes, not torch's 10: ranks wait at barriers while rank 0 writes tens of GB of checkpoint.
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
    return device


def _mean_over_steps(history: list[dict]) -> dict:
    return {key: sum(h[key] for h in history) / len(history) for key in history[0]}


def _mean_over_group(status: dict, group, device) -> dict:
    keys = sorted(status)
    values = torch.tensor([float(status[k]) for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values, group=group)
    values /= torch.distributed.get_world_size(group=group)
    return dict(zip(keys, values.tolist(), strict=True))
