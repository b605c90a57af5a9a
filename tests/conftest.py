import os

import helpers_stubs
import pytest

# Before any test imports OpenRLHF: stub exactly flash_attn_2_cuda and vllm where they are not installed.
STUBBED_MODULES = helpers_stubs.install_import_stubs()
STUB_SITE = os.path.join(os.path.dirname(__file__), "stub_site")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster of 2 CPUs for a test module. Workers get the same two import stubs as this process
    (stub_site/sitecustomize.py) and can import the package and the test helpers, as a real job gets them from its
    runtime_env."""
    import ray

    env = {"PYTHONPATH": helpers_stubs.ray_worker_pythonpath()}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run on the GPU box (see docs/gpu-runs.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_runtest_logreport(report):
    """Append each test's record_property values to $MEASURED_LOG as soon as the test has run (tools/gpu_session.sh
    sets it): a run stopped by its time limit keeps what its finished tests measured."""
    path = os.environ.get("MEASURED_LOG")
    if path and report.when == "call" and report.user_properties:
        with open(path, "a") as log:
            for name, value in report.user_properties:
                log.write(f"measured {report.nodeid} ({report.outcome}): {name} = {value}\n")


@pytest.fixture
def stub_env():
    """Environment for a subprocess that must import OpenRLHF with the same import stubs as this process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (STUB_SITE, env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture
def cpu_shims(monkeypatch):
    """megatron's CUDA-only calls replaced for this test only (helpers_megatron.install_cpu_shims), then restored."""
    import helpers_megatron
    import megatron.core.tensor_parallel.random as tp_random
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher
    import torch

    for name in ("current_device", "Stream", "Event", "current_stream", "stream", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, getattr(torch.cuda, name))  # records the original for undo
    for module in (moe_utils, token_dispatcher):
        monkeypatch.setattr(module, "maybe_move_tensor_to_cpu", module.maybe_move_tensor_to_cpu)
    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state"):
        monkeypatch.setattr(tp_random, name, getattr(tp_random, name))
    helpers_megatron.install_cpu_shims()
