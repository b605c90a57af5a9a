"""The megatron backend's GPU optimizer path, run on 2 gloo CPU processes (EP=2, bf16 weights, fp32 gradients).

On CUDA `build_optimizer` returns megatron's ChainedOptimizer of DistributedOptimizers over torch's AdamW (no
Transformer Engine or Apex, as on the GPU box), which the CPU suite otherwise never builds: CPU runs use `TorchAdamW`.
Here the workers emulate CUDA tensors (`helpers_cpu_shims.emulate_cuda_tensors`) and report CUDA as available while
the DDP wrapper and the optimizer are built, so the package takes its GPU branches with megatron's real optimizer.

Three steps, a save after the second, a fresh model resumed from it: the resumed third step equals the
uninterrupted one bit for bit, each Adam step counter reads 3, and saving and resuming again works. megatron-core
0.19.2's own `load_parameter_state` fails this three ways (training_state._load_parameter_state says which).
"""

import helpers_megatron as hm
import helpers_megatron_resume
import pytest
import torch

pytest.importorskip("megatron.core")


def test_megatron_optimizer_resumes_a_checkpoint_exactly(tmp_path):
    worker = helpers_megatron_resume.resume_worker
    torch.multiprocessing.spawn(worker, args=(2, hm.free_port(), str(tmp_path)), nprocs=2)
    assert sorted(p.name for p in tmp_path.glob("*.ok")) == ["rank0.ok", "rank1.ok"]
