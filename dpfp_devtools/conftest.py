"""The doctests of ``dpfp_devtools.tpu`` compile for a TPU: they need libtpu (``make tpu-compiler``).

Without it they are skipped, as tests/test_tpu_compile.py is; where ``DPFP_TPU_COMPILER`` names
it (``make test`` does) a missing libtpu fails them instead.
"""

import os

import pytest


@pytest.fixture(autouse=True)
def _needs_libtpu(request):
    if request.node.name.split(".")[:2] == ["dpfp_devtools", "tpu"]:
        from dpfp_devtools import tpu

        reason = tpu.missing_compiler()
        if reason is not None:
            (pytest.fail if os.environ.get(tpu.COMPILER_VARIABLE) else pytest.skip)(reason)
