"""The engine interface behind the stability loop: generation, token log-probs and one optimizer step.

The loop never touches a model directly, so a Megatron engine can replace the Hugging Face one (`--engine megatron`)
without changing the RL code. Batches use one layout everywhere: prompts left-padded to a common length P, responses
right-padded to a common length L; `action_mask` marks response tokens up to and including the first EOS.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NotRequired, Protocol, TypedDict, Unpack

import torch

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (N, P + L)
    attention_mask: torch.Tensor  # (N, P + L): 1 on prompt tokens and on response tokens up to the first EOS
    prompt_len: int  # P

    @property
    def action_mask(self) -> torch.Tensor:  # (N, L)
        return self.attention_mask[:, self.prompt_len :]

    @property
    def response_ids(self) -> torch.Tensor:  # (N, L)
        return self.input_ids[:, self.prompt_len :]

    def select(self, index: torch.Tensor) -> "TokenBatch":
        return TokenBatch(self.input_ids[index], self.attention_mask[index], self.prompt_len)


@dataclass
class TokenScores:
    log_probs: torch.Tensor  # (N, L) log-prob of each response token under the scored model
    entropy: torch.Tensor | None = None  # (N, L) entropy of the next-token distribution, when asked for
    router: dict[str, float] | None = None  # router_load_stats over valid tokens, when asked for


class PolicyEngine(Protocol):
    """What the stability loop needs from a training backend (one process, one device)."""

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, greedy: bool, seed: int) -> TokenBatch:
        """Sample at temperature 1 (or decode greedily) one response per prompt; `seed` fixes the sampling noise."""
        ...

    def score(self, batch: TokenBatch, *, reference: bool = False, with_stats: bool = False) -> TokenScores:
        """Log-probs of the batch's response tokens under the policy (or the frozen reference), without grad."""
        ...

    def train_step(self, batch: TokenBatch, loss_fn: LossFn) -> tuple[float, dict[str, float]]:
        """One optimizer step on loss_fn(log_probs); returns (grad norm before clipping, loss metrics as floats)."""
        ...

    def reset_optimizer(self, lr: float, weight_decay: float, grad_clip: float) -> None:
        """Start a fresh optimizer over the policy's parameters (new run phase: SFT, then each RL algorithm)."""
        ...

    def set_lr(self, lr: float) -> None:
        """Change the learning rate of the current optimizer (the warm start decays it linearly)."""
        ...

    def freeze_reference(self) -> None:
        """Keep a frozen copy of the current policy weights as the KL reference."""
        ...

    def model_state(self) -> dict[str, torch.Tensor]: ...

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def optimizer_state(self) -> dict[str, Any]: ...

    def load_optimizer_state(self, state: dict[str, Any]) -> None: ...


class EngineSettings(TypedDict):
    """The keyword arguments every engine's constructor takes."""

    model_size: str
    vocab_size: int
    seed: int
    device: str
    eos_id: int
    pad_id: int
    decode_cache: NotRequired[str]  # "dynamic" (default) or "static"


def make_engine(name: str, **settings: Unpack[EngineSettings]):
    """Build the engine named on the command line."""
    if name == "hf":
        from openrlhf_gmpo.stability.hf_engine import HFEngine

        return HFEngine(**settings)
    if name == "megatron":
        try:
            import megatron.core  # noqa: F401  (the engine imports it lazily; fail here with a readable message)
        except ImportError as error:
            raise SystemExit(
                f"--engine megatron cannot import megatron-core ({error}); install the package's dependencies "
                "(megatron-core==0.19.2) or use --engine hf"
            ) from None
        from openrlhf_gmpo.megatron import StabilityEngine

        return StabilityEngine(**settings)
    raise SystemExit(f"unknown --engine {name!r}: choose hf or megatron")
