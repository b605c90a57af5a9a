# Put this folder on PYTHONPATH for a subprocess started by a test: it gets the same two import stubs
# (flash_attn_2_cuda, vllm) that tests/conftest.py registers in the test process.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import helpers_stubs  # noqa: E402

helpers_stubs.install_import_stubs()

if os.environ.get("GMPO_TEST_MEGATRON_CPU_SHIMS") == "1":
    # A Ray worker that OpenRLHF itself creates (RayActorGroup), where a test cannot call the shims first.
    import helpers_cpu_shims  # noqa: E402
    import torch  # noqa: E402

    torch.set_num_threads(1)
    helpers_cpu_shims.install_cpu_shims()
    helpers_cpu_shims.host_cuda_tensors()  # pipeline parallelism

if os.environ.get("GMPO_TEST_DEEPSPEED_CPU_SHIMS") == "1":
    # OpenRLHF's DeepSpeed policy actor in a Ray worker, on DeepSpeed's CPU accelerator.
    import helpers_cpu_shims  # noqa: E402

    helpers_cpu_shims.install_deepspeed_cpu_shims()
