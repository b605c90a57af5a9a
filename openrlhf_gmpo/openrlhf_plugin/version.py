"""The one OpenRLHF release line this plugin is written against, checked loudly before anything is patched."""

from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version

SUPPORTED_SERIES = "0.11"

# Modules OpenRLHF's entry points import at load time that exist only on GPU machines, and how users get them.
GPU_ONLY_MODULES = {
    "vllm": "pip install 'openrlhf-gmpo[vllm]'",
    "flash_attn_2_cuda": "flash-attn built with CUDA: pip install --no-build-isolation flash-attn==2.8.3",
}


def check_openrlhf_version() -> str:
    """Return the installed OpenRLHF version; raise SystemExit unless it is 0.11.x.

    The plugin replaces OpenRLHF's policy loss and reuses its argument parser by hooking private structure
    (the `__main__` block of openrlhf.cli.train_ppo_ray, PolicyLoss.forward's return tuple), which changes
    between minor releases, so any other series is refused rather than half-working.
    """
    try:
        installed = version("openrlhf")
    except PackageNotFoundError:
        raise SystemExit(
            f"openrlhf_gmpo: OpenRLHF is not installed; this plugin supports openrlhf {SUPPORTED_SERIES}.x "
            "(pip install openrlhf==0.11.2)"
        ) from None
    if installed.split(".")[:2] != SUPPORTED_SERIES.split("."):
        raise SystemExit(
            f"openrlhf_gmpo: installed openrlhf is {installed}, but this plugin supports only "
            f"openrlhf {SUPPORTED_SERIES}.x (pip install openrlhf==0.11.2)"
        )
    return installed


@contextmanager
def explain_missing_gpu_modules(entry_point: str):
    """Turn OpenRLHF's load-time import of a GPU-only module into one line naming the module and its install.

    OpenRLHF imports them before its parser exists, so even a dry run of `entry_point` needs them.
    """
    try:
        yield
    except ModuleNotFoundError as error:
        if error.name not in GPU_ONLY_MODULES:
            raise
        raise SystemExit(
            f"openrlhf_gmpo: {entry_point} needs {error.name!r} ({GPU_ONLY_MODULES[error.name]}), which is not "
            "installed here; run on a machine of your GPU cluster"
        ) from error
