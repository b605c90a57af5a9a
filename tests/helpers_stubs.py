"""Import stubs for the two modules OpenRLHF needs that cannot exist on a GPU-less CI machine.

- `flash_attn_2_cuda`: flash-attn's compiled CUDA extension; flash-attn installs as pure Python without it, and
  `openrlhf.models` imports flash-attn at module level even when attention runs in eager/SDPA mode.
- `vllm`: OpenRLHF's rollout engine; `openrlhf.trainer.ray` imports it at module level.

Only these two are stubbed (the rest of OpenRLHF is real). Any use of a stubbed name raises, so a test that
accidentally relies on vLLM or the CUDA kernels fails loudly instead of passing on a fake.
"""

import importlib.util
import os
import sys
import types

STUBBED = ("flash_attn_2_cuda", "vllm")
_VLLM_SUBMODULES = (
    "vllm.inputs",
    "vllm.utils",
    "vllm.distributed",
    "vllm.distributed.utils",
    "vllm.distributed.device_communicators",
    "vllm.distributed.device_communicators.pynccl",
)


class _Unavailable:
    """Stands in for any vLLM / flash-attn CUDA name; using it raises."""

    def __init__(self, qualname: str):
        self._qualname = qualname

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._qualname} is an import stub: the real package is not installed on this machine")

    def __getattr__(self, name: str):
        return _Unavailable(f"{self._qualname}.{name}")


def _stub_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = f"<import stub for {name}>"
    module.__path__ = []  # a package, so submodule imports resolve to our other stubs
    module.__getattr__ = lambda attr: _Unavailable(f"{name}.{attr}")
    module.IS_IMPORT_STUB = True
    # OpenRLHF's policy actor compares vllm.__version__ before touching vLLM: a valid version that says "stub".
    module.__version__ = "0+import.stub"
    return module


def install_import_stubs() -> list[str]:
    """Register stubs for the STUBBED modules that are not really installed; returns the names stubbed."""
    stubbed = []
    for name in STUBBED:
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        names = (name, *_VLLM_SUBMODULES) if name == "vllm" else (name,)
        for module_name in names:
            sys.modules[module_name] = _stub_module(module_name)
        stubbed.append(name)
    return stubbed


def is_really_installed(name: str) -> bool:
    """Whether the real module `name` is importable (an import stub registered here does not count)."""
    module = sys.modules.get(name)
    if module is not None:
        return vars(module).get("IS_IMPORT_STUB") is not True
    return importlib.util.find_spec(name) is not None


def ray_worker_pythonpath() -> str:
    """PYTHONPATH for Ray workers started by a test: the same import stubs (stub_site/sitecustomize.py), and the
    package and the test helpers importable, as a real job gets them from its runtime_env."""
    tests = os.path.dirname(os.path.abspath(__file__))
    return os.pathsep.join([os.path.join(tests, "stub_site"), os.path.dirname(tests), tests])
