"""The one OpenRLHF release this plugin is written against, checked loudly before anything is patched."""

from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version

# Exactly one release: 0.11.0 and 0.11.1 parse other flags (no --actor.loss_agg_mode, no is_correction_level) and
# return a 4-tuple from PolicyLoss, and the plugin hooks private structure that can change in any release.
SUPPORTED_VERSION = "0.11.2"

# Modules OpenRLHF's entry points import at load time that exist only on GPU machines, and how users get them.
GPU_ONLY_MODULES = {
    "vllm": "pip install 'openrlhf-gmpo[vllm]'",
    "flash_attn_2_cuda": "flash-attn built with CUDA: pip install --no-build-isolation flash-attn==2.8.3",
}


def check_openrlhf_version() -> str:
    """Return the installed OpenRLHF version; raise SystemExit unless it is exactly 0.11.2.

    The plugin replaces OpenRLHF's policy loss and reuses its argument parser by hooking private structure
    (the `__main__` block of openrlhf.cli.train_ppo_ray, PolicyLoss.forward's signature and return tuple, the
    parsed flags), verified for one release; any other is refused rather than half-working.
    """
    try:
        installed = version("openrlhf")
    except PackageNotFoundError:
        raise SystemExit(
            f"openrlhf_gmpo: OpenRLHF is not installed; this plugin supports openrlhf {SUPPORTED_VERSION} "
            f"(pip install openrlhf=={SUPPORTED_VERSION})"
        ) from None
    if installed != SUPPORTED_VERSION:
        raise SystemExit(
            f"openrlhf_gmpo: installed openrlhf is {installed}, but this plugin supports only openrlhf "
            f"{SUPPORTED_VERSION} (pip install openrlhf=={SUPPORTED_VERSION}); on a Ray cluster, every node's "
            "environment needs it"
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
