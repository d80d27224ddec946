"""Data parallelism: sharded jit and pmap on 8 host CPU devices equal one device."""

import pytest

from tests.helpers import SCRIPTS, run_with_host_devices

# Also run by `make test` with the newest jax admitted (.venv-newest): see the Makefile.
pytestmark = pytest.mark.jax_sensitive


def test_sharded_and_pmapped_dpfpformer_match_single_device():
    result = run_with_host_devices(SCRIPTS / "multidevice_script.py")
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr


def test_decoding_with_a_replicated_cache_follows_the_batch_sharding():
    result = run_with_host_devices(SCRIPTS / "decode_sharded_script.py")
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr


def test_every_impl_differentiates_and_reshards_state_on_batch_and_head_meshes():
    result = run_with_host_devices(SCRIPTS / "sharded_grad_script.py")
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr
