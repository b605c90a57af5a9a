"""Hugging Face engine: Qwen3-MoE from openrlhf_gmpo.countdown.model, `generate` with KV cache, AdamW.

On CUDA the model runs in bf16 with grouped_mm experts (FACTS.md: ~2x faster generation, ~3x faster training than
eager experts at 200M), while AdamW updates fp32 master weights: RL learning rates are far below bf16's resolution, so
updating bf16 weights in place would round most updates away. On CPU everything stays fp32.

Decoding keeps grouped_mm experts. Hugging Face (5.15-5.17) switches them to `batched_mm` for the decode loop on any
accelerator, which gathers a copy of each token's expert weights: at the 200m preset's 512 rows that is 2.4 GB written
and read per layer and decode step, against 38 MB of expert weights that grouped_mm reads once. FACTS.md's ~22 ms per
decode step was measured with that switch in place.

`decode_cache="static"` decodes into a fixed-size KV cache; on CUDA Hugging Face then compiles the decode step
(torch.compile, CUDA graphs), which removes the per-kernel launch overhead. One cache per (rows, length) is kept and
reset between calls: a new cache per call would give the graph new input addresses, so it would be re-recorded every
RL step (and torch 2.11 stops using CUDA graphs after 128 such re-records). Prompts are left-padded to a multiple of
PROMPT_BUCKET so a handful of graphs serve every batch.
"""

import contextlib
import copy
from typing import Any

import torch

from openrlhf_gmpo.stability.config import DECODE_CACHES
from openrlhf_gmpo.stability.engine import LossFn, TokenBatch, TokenScores
from openrlhf_gmpo.stability.master_adamw import MasterAdamW
from openrlhf_gmpo.stability.rl_math import router_load_stats, token_entropy

PROMPT_BUCKET = 16  # static decoding pads prompts to a multiple of this: each distinct width is one more compiled graph


class HFEngine:
    # Compile static decoding off CUDA too (Hugging Face compiles only on accelerators); tests set it to exercise the
    # compiled path on CPU.
    compile_on_cpu = False

    def __init__(
        self,
        *,
        model_size: str,
        vocab_size: int,
        seed: int,
        device: str,
        eos_id: int,
        pad_id: int,
        decode_cache: str = "dynamic",
        master_weights: bool = True,
    ):
        """`master_weights=False` leaves out the fp32 master copies (a model that only generates and scores)."""
        from openrlhf_gmpo.countdown.model import build_model, to_low_precision

        if decode_cache not in DECODE_CACHES:
            raise ValueError(f"decode_cache {decode_cache!r}: choose one of {', '.join(DECODE_CACHES)}")
        self.decode_cache = decode_cache
        self.device = torch.device(device)
        self.eos_id, self.pad_id = eos_id, pad_id
        model = build_model(model_size, vocab_size, seed)
        if self.device.type == "cuda":
            model = to_low_precision(model, torch.bfloat16)
            model.set_experts_implementation("grouped_mm")
            keep_experts_implementation_while_decoding(model)
        self.model = model.to(self.device)
        self._static_caches: dict[tuple[int, int], Any] = {}
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = MasterAdamW(self.params, master_weights)  # fp32 masters only when the model is not fp32
        self.reference = None
        self.top_k = model.config.num_experts_per_tok

    # ---- generation and scoring -------------------------------------------------------------------------------
    def _left_pad(self, prompts: list[list[int]], bucket: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        width = -(-max(len(p) for p in prompts) // bucket) * bucket
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, greedy: bool, seed: int) -> TokenBatch:
        static = self.decode_cache == "static"
        ids, mask = self._left_pad(prompts, PROMPT_BUCKET if static else 1)
        torch.manual_seed(seed)  # HF sampling draws from the global generator; seeding it per call makes resume exact
        self.model.eval()
        # Sampling at temperature 1 with no top-k/top-p draws from the policy's own distribution, so the old log-probs
        # the loss uses are exactly on-policy.
        sampling = {} if greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            use_cache=True,
            **sampling,
            **(self._static_cache_options(len(prompts), ids.shape[1] + max_new_tokens) if static else {}),
        )
        response = out[:, ids.shape[1] :]
        # keep tokens up to and including the first EOS; anything after it is padding
        is_eos = (response == self.eos_id).long()
        after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0
        response = response.masked_fill(after_eos, self.pad_id)
        return TokenBatch(
            torch.cat([ids, response], dim=1), torch.cat([mask, (~after_eos).long()], dim=1), ids.shape[1]
        )

    def _static_cache_options(self, rows: int, length: int) -> dict[str, Any]:
        from transformers import CompileConfig, StaticCache

        cache = self._static_caches.get((rows, length))
        if cache is None:  # sized and placed by its first update
            cache = self._static_caches[(rows, length)] = StaticCache(config=self.model.config, max_cache_len=length)
        else:
            cache.reset()  # zeroed in place: same addresses, so the compiled decode step replays its graph
        options: dict[str, Any] = {"past_key_values": cache}
        if self.device.type == "cuda" or self.compile_on_cpu:
            # fullgraph: a graph break would silently fall back to slow partial graphs; dynamic=False: one graph per
            # (batch, width), never a slower dynamic-shape graph.
            config = CompileConfig(fullgraph=True, dynamic=False)
            config._compile_all_devices = self.compile_on_cpu or None
            options["compile_config"] = config
        return options

    def _forward(self, model, batch: TokenBatch, with_router: bool):
        # positions count only real tokens, as generate() does for left-padded prompts
        position_ids = (batch.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids,
            use_cache=False,
            output_router_logits=with_router,
        )
        logits = out.logits[:, batch.prompt_len - 1 : -1].float()  # (N, L, V): logits that predict each response token
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
        return log_probs, logits, out

    @torch.no_grad()
    def score(self, batch: TokenBatch, *, reference: bool = False, with_stats: bool = False) -> TokenScores:
        model = self.reference if reference else self.model
        if model is None:
            raise RuntimeError("score(reference=True) needs freeze_reference() first")
        model.eval()
        log_probs, logits, out = self._forward(model, batch, with_router=with_stats)
        if not with_stats:
            return TokenScores(log_probs)
        router = router_load_stats(out.router_logits, batch.attention_mask, self.top_k)
        return TokenScores(log_probs, token_entropy(logits), router)

    # ---- training -------------------------------------------------------------------------------------------------
    def reset_optimizer(self, lr: float, weight_decay: float, grad_clip: float) -> None:
        self.opt.reset(lr, weight_decay, grad_clip)

    def set_lr(self, lr: float) -> None:
        self.opt.set_lr(lr)

    def train_step(self, batch: TokenBatch, loss_fn: LossFn) -> tuple[float, dict[str, float]]:
        self.model.train()
        log_probs, _, _ = self._forward(self.model, batch, with_router=False)
        loss, metrics = loss_fn(log_probs)
        loss.backward()
        grad_norm = self.opt.step([param.grad for param in self.params])
        self.model.zero_grad(set_to_none=True)
        return grad_norm, {"loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}}

    def freeze_reference(self) -> None:
        self.reference = copy.deepcopy(self.model).eval()
        self.reference.requires_grad_(False)

    # ---- state ----------------------------------------------------------------------------------------------------
    def model_state(self) -> dict[str, torch.Tensor]:
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        source = self.opt.trained
        return {n: t.detach().float().cpu().clone() for n, t in zip(names, source, strict=True)}

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        missing = [n for n, _ in named if n not in state]
        if missing or len(state) != len(named):
            raise ValueError(f"model state does not match the model: missing {missing[:3]}, {len(state)} tensors given")
        with torch.no_grad():
            for i, (name, param) in enumerate(named):
                param.copy_(state[name])
                if self.opt.master is not None:
                    self.opt.master[i].copy_(state[name])

    def optimizer_state(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state)


def keep_experts_implementation_while_decoding(model) -> None:
    """Stop Hugging Face's generate from swapping grouped_mm experts for batched_mm in its decode loop (see the module
    docstring); the swap lives in the private context manager `_optimize_model_for_decode` (transformers 5.15-5.17)."""
    if not hasattr(model, "_optimize_model_for_decode"):
        raise RuntimeError(
            "transformers no longer has GenerationMixin._optimize_model_for_decode; check how this version picks the "
            "experts implementation for decoding before running the 200m preset"
        )
    model._optimize_model_for_decode = contextlib.nullcontext
