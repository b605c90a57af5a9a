"""The losses on CUDA agree with the CPU results (run on the GPU box; skipped without CUDA)."""

import pytest
import torch
from helpers_losses import random_batch

from openrlhf_gmpo.losses import LOSS_NAMES, compute_policy_loss


@pytest.mark.gpu
@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(name, dtype):
    log_probs, old, advantages, mask = random_batch(4, batch=16, length=64)
    inputs = [log_probs.detach().to(dtype), old.to(dtype), advantages, mask.long()]
    results = {}
    for device in ("cpu", "cuda"):
        leaf = inputs[0].to(device).clone().requires_grad_(True)
        rest = [t.to(device) for t in inputs[1:]]
        loss, metrics = compute_policy_loss(
            name, leaf, *rest, clip_eps_low=0.2, clip_eps_high=0.3, rollout_log_probs=rest[0] - 0.1
        )
        loss.backward()
        results[device] = (loss.cpu(), leaf.grad.float().cpu(), {k: v.cpu() for k, v in metrics.items()})
    (loss_cpu, grad_cpu, m_cpu), (loss_gpu, grad_gpu, m_gpu) = results["cpu"], results["cuda"]
    torch.testing.assert_close(loss_gpu, loss_cpu, rtol=1e-5, atol=1e-6)
    # the gradient is computed in fp32 and cast to the input dtype: one bf16 rounding step (2^-8) may differ
    grad_rtol = 1e-4 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(grad_gpu, grad_cpu, rtol=grad_rtol, atol=1e-6)
    for key in m_cpu:
        torch.testing.assert_close(m_gpu[key], m_cpu[key], rtol=1e-5, atol=1e-6, msg=key)
