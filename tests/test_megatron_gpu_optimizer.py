"""The megatron backend's GPU optimizer path, run on 2 gloo CPU processes (bf16 weights).

On CUDA `build_optimizer` returns megatron's ChainedOptimizer of DistributedOptimizers over torch's AdamW (no
Transformer Engine or Apex, as on the GPU box), which the CPU suite otherwise never builds: CPU runs use `TorchAdamW`.
Here the workers emulate CUDA tensors (`helpers_cpu_shims.emulate_cuda_tensors`) and report CUDA as available while
the DDP wrapper and the optimizer are built, so the package takes its GPU branches with megatron's real optimizer.

At EP=2, and at PP=2 (each stage saves and loads its own layers' optimizer state): three steps, a save after the
second, a fresh model resumed from it and put through the actor's offload and reload (sleep mode); the resumed
third step equals the uninterrupted one bit for bit, each Adam step counter reads 3, and saving and resuming again
works. megatron-core 0.19.2's own `load_parameter_state` fails this three ways
(training_state._load_parameter_state and model._norms_to say which).
"""

import helpers_megatron as hm
import helpers_megatron_resume
import pytest
import torch

pytest.importorskip("megatron.core")


@pytest.mark.parametrize(
    "layout, optimizers",
    [
        (dict(ep=2), ["DistributedOptimizer", "DistributedOptimizer"]),  # dense (DP 2) and experts (expert DP 1)
        (dict(pp=2), ["DistributedOptimizer"]),  # two stages of one replica: dense and expert DP are both 1
    ],
    ids=["ep2", "pp2"],
)
def test_megatron_optimizer_resumes_a_checkpoint_exactly(tmp_path, layout, optimizers):
    worker = helpers_megatron_resume.resume_worker
    torch.multiprocessing.spawn(worker, args=(2, hm.free_port(), str(tmp_path), layout), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert result["optimizers"] == optimizers
        # Norms included: megatron's local spec builds them in fp32 whatever params_dtype says (model._norms_to).
        assert result["dtypes"] == {torch.bfloat16}
        # megatron's groups: matrices decay (wd_mult 1), biases and norms not (0); build_optimizer applies the 0.1
        assert result["weight_decays"] == [(0.0, 0.0), (1.0, 0.1)]
        assert result["client_states"] == ({"episode": 2}, {"episode": 3})
        # Bit for bit: the loaded weights, and the third step taken after the resume (optimizer state restored).
        assert result["loaded_difference"] == 0.0 and result["third_step_difference"] == 0.0
        assert result["grad_norms"][0] == result["grad_norms"][1]
        assert result["third_step_moved"] > 0
        # Three steps, one counter per parameter. (A shared counter reads 2 + its optimizer's parameter count after
        # the resumed step, and the second load then asserts that the dense and expert optimizers' steps differ.)
        # Where the counters live is checked on CUDA only (test_megatron_gpu.py): here every tensor is on the host.
        assert result["step_counters"] == [3.0] and result["step_counters_distinct"]


def test_bf16_gradient_buffers_give_the_fp32_buffers_step(tmp_path):
    # --megatron.bf16_grads (both 30B-A3B presets): DDP accumulates and reduces gradients in bf16, half the buffer.
    worker = helpers_megatron_resume.bf16_grads_worker
    torch.multiprocessing.spawn(worker, args=(2, hm.free_port(), str(tmp_path)), nprocs=2)
    before = {name: t.to(torch.bfloat16).float() for name, t in hm.tiny_hf_moe().state_dict().items()}
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        fp32, bf16 = result["fp32"], result["bf16"]
        assert fp32["buffer_dtypes"] == {torch.float32} and bf16["buffer_dtypes"] == {torch.bfloat16}
        # bf16 has 8 bits of mantissa: the norm of bf16-rounded gradients agrees to ~1e-3 (measured 4e-5).
        assert bf16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=1e-3)
        # A first Adam step moves each weight by about lr = 1e-3 against its gradient's sign, which bf16 rounding of
        # the gradient keeps: the weights after both steps agree (measured: bit for bit). The bound is one bf16
        # rounding of each weight, below the 2 lr a step against the sign would make for most weights.
        for name, tensor in bf16["weights"].items():
            torch.testing.assert_close(tensor, fp32["weights"][name], rtol=2**-7, atol=1e-5, msg=name)
        assert max((bf16["weights"][n] - before[n]).abs().max().item() for n in before) > 5e-4
