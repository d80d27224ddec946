"""Data parallelism: sharded jit and pmap on 8 host CPU devices equal one device."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Also run by `make test` with the newest jax admitted (.venv-newest): see the Makefile.
pytestmark = pytest.mark.jax_sensitive

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_with_host_devices(script: Path, count: int = 8) -> subprocess.CompletedProcess:
    """Run a script in a fresh Python with ``count`` host CPU devices; the repo root is importable
    (``tests.*``, ``examples.*``) as it is for pytest itself."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()
    env = {**os.environ, "XLA_FLAGS": flags,
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)


def test_sharded_and_pmapped_dpfpformer_match_single_device():
    result = run_with_host_devices(Path(__file__).with_name("multidevice_script.py"))
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr


def test_decoding_with_a_replicated_cache_follows_the_batch_sharding():
    result = run_with_host_devices(Path(__file__).with_name("decode_sharded_script.py"))
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr


def test_every_impl_differentiates_and_reshards_state_on_batch_and_head_meshes():
    result = run_with_host_devices(Path(__file__).with_name("sharded_grad_script.py"))
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr
