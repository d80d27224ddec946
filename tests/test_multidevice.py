"""Data parallelism: sharded jit and pmap on 8 host CPU devices equal one device."""

import os
import subprocess
import sys
from pathlib import Path


def run_with_host_devices(script: Path, count: int = 8) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}",
           "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)


def test_sharded_and_pmapped_dpfpformer_match_single_device():
    result = run_with_host_devices(Path(__file__).with_name("multidevice_script.py"))
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr
