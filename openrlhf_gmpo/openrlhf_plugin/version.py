"""The one OpenRLHF release line this plugin is written against, checked loudly before anything is patched."""

from importlib.metadata import PackageNotFoundError, version

SUPPORTED_SERIES = "0.11"


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
