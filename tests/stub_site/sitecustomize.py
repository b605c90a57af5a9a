# Put this folder on PYTHONPATH for a subprocess started by a test: it gets the same two import stubs
# (flash_attn_2_cuda, vllm) that tests/conftest.py registers in the test process.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import helpers_stubs  # noqa: E402

helpers_stubs.install_import_stubs()
