"""`openrlhf-gmpo stability --engine megatron`: the stability harness's policy trained and scored in megatron-core.

The harness then exercises the model code the megatron actor uses on a cluster (docs/megatron.md): the HF -> megatron
weight mapping, the GPTModel with megatron's router and token dispatcher, and `token_log_probs`, at TP = EP = PP = 1
in one process.

- Training and log-probs: a GPTModel built from the HF CountDown model (`build_gpt_model` + `load_hf_weights`),
  wrapped in megatron's DDP (`wrap_ddp`) for fp32 gradient buffers. On CUDA the parameters are bf16 and AdamW updates
  fp32 master weights, as HFEngine does (RL learning rates are below bf16's resolution).
- The optimizer is torch AdamW over those master weights, not megatron's: megatron's rebuilds its fp32 masters from
  the bf16 parameters whenever one is created, and the harness creates one per phase right after loading fp32
  weights, so each phase would start from bf16-rounded weights; and its state dict leaves out the Adam moments (they
  go through megatron's separate parameter-state checkpoint). The same optimizer as HFEngine also makes the two
  engines' updates directly comparable (tests).
- Generation: HFEngine's `generate` (KV cache, static decoding) on a HF copy of the policy, refreshed from the megatron
  weights (`iter_hf_weights`) before a `generate` whenever the policy changed since the last refresh.
- megatron-core runs on CPU only with test-only patches (tests/helpers_megatron.py), so production runs need CUDA.
"""

from typing import Any, Unpack

import torch

from openrlhf_gmpo.stability.engine import EngineSettings, LossFn, TokenBatch, TokenScores
from openrlhf_gmpo.stability.hf_engine import HFEngine
from openrlhf_gmpo.stability.master_adamw import MasterAdamW


class _MasterWeights:
    """The GPT model's parameter names over its fp32 master weights: what `iter_hf_weights` and `load_hf_weights` read
    from a model, so the master weights go through the same HF mapping as the parameters, at full precision."""

    def __init__(self, model: torch.nn.Module, masters: list[torch.Tensor]):
        self._named = [(name, master) for (name, _), master in zip(model.named_parameters(), masters, strict=True)]

    def named_parameters(self):
        return iter(self._named)


class StabilityEngine:
    # Tests set this after installing the CPU shims of tests/helpers_megatron.py; package code never patches torch.
    allow_cpu = False

    def __init__(self, **settings: Unpack[EngineSettings]):
        device, seed = settings["device"], settings["seed"]
        self.device = torch.device(device)
        # On a CUDA machine megatron-core puts the model on the GPU whatever --device says, so CPU needs both the
        # test switch and no GPU.
        if self.device.type != "cuda" and not (self.allow_cpu and not torch.cuda.is_available()):
            raise SystemExit(
                f"--engine megatron needs CUDA (this run's device is {device}): megatron-core runs on CPU only with "
                "test-only patches; use --engine hf for CPU runs"
            )
        from openrlhf_gmpo.megatron.model import build_gpt_model
        from openrlhf_gmpo.megatron.parallel import ParallelSizes
        from openrlhf_gmpo.megatron.train import wrap_ddp
        from openrlhf_gmpo.megatron.weights import load_hf_weights

        _init_single_process(self.device, seed)
        # HFEngine builds the HF model with countdown.model.build_model(model_size, vocab_size, seed); the GPTModel
        # starts from the same weights (bf16-rounded on CUDA, as HFEngine's own model).
        # The HF copy only generates and reports stats: it needs no fp32 master weights (0.8 GB on the 200m model).
        self.hf = HFEngine(**settings, master_weights=False)
        self.hf_config = self.hf.model.config
        self.sizes = ParallelSizes(1)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.gpt = build_gpt_model(self.hf_config, self.sizes, params_dtype=self.dtype)
        load_hf_weights(self.gpt, self.hf.model.state_dict(), self.hf_config)
        self.ddp = wrap_ddp(self.gpt)
        self.params = list(self.gpt.parameters())
        self.opt = MasterAdamW(self.params)  # fp32 master copies only when the parameters are not fp32
        self.hf_names = {name for name, _ in self.hf.model.named_parameters()}  # HFEngine.model_state's keys
        self.reference = None
        self.hf_stale = False  # True when the policy changed after the HF copy was last refreshed

    # ---- generation and scoring -------------------------------------------------------------------------------
    def _refresh_hf(self) -> None:
        if not self.hf_stale:
            return
        from openrlhf_gmpo.megatron.weights import iter_hf_weights

        hf_params = dict(self.hf.model.named_parameters())
        with torch.no_grad():
            for name, tensor in iter_hf_weights(self.gpt, self.hf_config):
                if name in hf_params:  # a tied lm_head.weight is the embedding, already copied
                    hf_params[name].copy_(tensor)
        self.hf_stale = False

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, greedy: bool, seed: int) -> TokenBatch:
        self._refresh_hf()
        return self.hf.generate(prompts, max_new_tokens=max_new_tokens, greedy=greedy, seed=seed)

    def _log_probs(self, model, batch: TokenBatch) -> torch.Tensor:
        from openrlhf_gmpo.megatron.logprobs import token_log_probs

        # Entry t of token_log_probs predicts token t+1, so response tokens P..P+L-1 are entries P-1..P+L-2.
        return token_log_probs(model, batch.input_ids, batch.attention_mask)[:, batch.prompt_len - 1 :]

    @torch.no_grad()
    def score(self, batch: TokenBatch, *, reference: bool = False, with_stats: bool = False) -> TokenScores:
        model = self.reference if reference else self.ddp
        if model is None:
            raise RuntimeError("score(reference=True) needs freeze_reference() first")
        if reference and with_stats:
            raise ValueError("score: the stats come from the HF copy of the policy; the reference has none")
        model.eval()
        log_probs = self._log_probs(model, batch)
        if not with_stats:
            return TokenScores(log_probs)
        # Entropy and router statistics come from the HF copy, which holds the policy's weights after the refresh:
        # megatron's forward yields neither full-vocabulary logits here nor router logits. The log-probs stay
        # megatron's (the tests check the copy's agree).
        self._refresh_hf()
        stats = self.hf.score(batch, with_stats=True)
        return TokenScores(log_probs, stats.entropy, stats.router)

    # ---- training -------------------------------------------------------------------------------------------------
    def reset_optimizer(self, lr: float, weight_decay: float, grad_clip: float) -> None:
        self.opt.reset(lr, weight_decay, grad_clip)

    def set_lr(self, lr: float) -> None:
        self.opt.set_lr(lr)

    def train_step(self, batch: TokenBatch, loss_fn: LossFn) -> tuple[float, dict[str, float]]:
        self.ddp.train()
        self.ddp.zero_grad_buffer()
        loss, metrics = loss_fn(self._log_probs(self.ddp, batch))
        loss.backward()  # DDP's hooks accumulate each gradient into the parameter's fp32 main_grad
        self.ddp.finish_grad_sync()
        grad_norm = self.opt.step([param.main_grad for param in self.params])
        self.hf_stale = True
        return grad_norm, {"loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}}

    def freeze_reference(self) -> None:
        from openrlhf_gmpo.megatron.model import build_gpt_model

        self.reference = None  # free the previous reference before building the next
        reference = build_gpt_model(self.hf_config, self.sizes, params_dtype=self.dtype)
        # Same constructor, same parameter order; the copy holds the policy's parameters (bf16 on CUDA, as HFEngine's).
        with torch.no_grad():
            for frozen, param in zip(reference.parameters(), self.params, strict=True):
                frozen.copy_(param)
        self.reference = reference.eval().requires_grad_(False)

    # ---- state ----------------------------------------------------------------------------------------------------
    def _weights(self):
        """What the HF mapping reads: the fp32 master weights when there are any, the parameters otherwise."""
        return self.gpt if self.opt.master is None else _MasterWeights(self.gpt, self.opt.master)

    def model_state(self) -> dict[str, torch.Tensor]:
        from openrlhf_gmpo.megatron.weights import iter_hf_weights

        return {
            name: tensor.detach().float().cpu().clone()
            for name, tensor in iter_hf_weights(self._weights(), self.hf_config)
            if name in self.hf_names
        }

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        from openrlhf_gmpo.megatron.weights import load_hf_weights

        if set(state) != self.hf_names:
            missing, extra = sorted(self.hf_names - set(state)), sorted(set(state) - self.hf_names)
            raise ValueError(f"model state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
        load_hf_weights(self.gpt, state, self.hf_config)
        if self.opt.master is not None:
            load_hf_weights(self._weights(), state, self.hf_config)
        self.hf_stale = True

    def optimizer_state(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state)


def _init_single_process(device: torch.device, seed: int) -> None:
    """torch.distributed (world size 1: nccl on CUDA, gloo on CPU) and megatron's parallel state, unless already set
    up (by a test, or by an earlier engine in this process)."""
    from megatron.core import parallel_state

    from openrlhf_gmpo.megatron.parallel import ParallelSizes, initialize_parallel_state

    if not torch.distributed.is_initialized():
        # One process: an in-memory store instead of a TCP rendezvous, so no port can be taken.
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    if torch.distributed.get_world_size() != 1:
        raise SystemExit(
            f"--engine megatron runs in one process; torch.distributed has {torch.distributed.get_world_size()} ranks"
        )
    if not parallel_state.model_parallel_is_initialized():
        initialize_parallel_state(ParallelSizes(1), seed=seed)
