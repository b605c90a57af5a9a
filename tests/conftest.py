import os

import helpers_stubs
import pytest

# Before any test imports OpenRLHF: stub exactly flash_attn_2_cuda and vllm where they are not installed.
STUBBED_MODULES = helpers_stubs.install_import_stubs()
STUB_SITE = os.path.join(os.path.dirname(__file__), "stub_site")


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


@pytest.fixture
def stub_env():
    """Environment for a subprocess that must import OpenRLHF with the same import stubs as this process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (STUB_SITE, env.get("PYTHONPATH")) if p)
    return env
