"""AdamW for the stability engines: over fp32 master copies of low-precision parameters, or the parameters themselves.

RL learning rates are far below bf16's resolution, so updating bf16 weights in place would round most updates away;
with master weights every step updates the fp32 copies and writes them back into the parameters. Both engines
(`HFEngine`, the megatron `StabilityEngine`) train through this one class, so their updates stay directly comparable.
"""

from typing import Any

import torch


class MasterAdamW:
    def __init__(self, params: list[torch.Tensor], master_weights: bool = True):
        """`master_weights=False`, or fp32 parameters, train the parameters themselves."""
        self.params = params
        self.master = None
        if master_weights and params[0].dtype != torch.float32:
            self.master = [p.detach().float().clone().requires_grad_(True) for p in params]
        self.optimizer = None
        self.grad_clip = None

    @property
    def trained(self) -> list[torch.Tensor]:
        """The tensors AdamW updates: the masters when there are any."""
        return self.master if self.master is not None else self.params

    def reset(self, lr: float, weight_decay: float, grad_clip: float) -> None:
        # torch's default: multi-tensor (foreach) kernels on CUDA, one parameter at a time on CPU (exact resume there)
        self.optimizer = torch.optim.AdamW(self.trained, lr=lr, weight_decay=weight_decay)
        self.grad_clip = grad_clip

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, grads: list[torch.Tensor | None]) -> float:
        """One clipped AdamW step from `grads` (one per parameter, None for none); returns the norm before clipping."""
        if self.optimizer is None:
            raise RuntimeError("train_step needs reset_optimizer() first")
        for trained, grad in zip(self.trained, grads, strict=True):
            trained.grad = None if grad is None else grad.float()  # fp32 already: the same tensor, no copy
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.master is not None:
            with torch.no_grad():
                for master, param in zip(self.master, self.params, strict=True):
                    param.copy_(master)
        return float(grad_norm)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
