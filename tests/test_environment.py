"""The installed environment is the one the package is pinned to, and the test stubs are only the allowed two."""

import importlib.metadata as md
import sys

import helpers_stubs


def test_python_is_312():
    # megatron-core >= 0.17 requires Python 3.12; the GPU box runs 3.12 too.
    assert sys.version_info[:2] == (3, 12)


def test_pinned_versions_installed():
    assert md.version("openrlhf") == "0.11.2"
    assert md.version("megatron-core") == "0.19.2"


def test_only_flash_attn_cuda_and_vllm_are_stubbed():
    stubbed = {name for name, module in list(sys.modules.items()) if vars(module).get("IS_IMPORT_STUB") is True}
    roots = {name.split(".")[0] for name in stubbed}
    assert roots <= set(helpers_stubs.STUBBED), roots


def test_our_tests_are_not_shadowed_by_openrlhf_tests_package():
    # OpenRLHF ships a top-level `tests` package; ours must come from this checkout.
    import helpers_stubs as ours

    assert "site-packages" not in ours.__file__
