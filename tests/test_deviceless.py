"""The GPU compile without a GPU: XLA's deviceless compile for an H200 (dpfp_devtools/deviceless.py).

These run jaxlib's own Triton pipeline and ptxas, as the GPU machine will, so a kernel that needs
more shared memory than an H200 program may have fails here. They need the CUDA plugin's
compiler, which `make test` and `make test-all` install in .venv/cuda-compiler and name in
DPFP_CUDA_COMPILER; each runs in a fresh Python because XLA's logging and dump settings are read
when jax loads. `make test` runs one case (the fused chunk kernel, delta rule, K = 128: about
12 s of compiling on one core), the rest are slow.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SLOW = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]
REPORT = REPO_ROOT / "docs" / "reports" / "triton_report_h200.md"
SHARED_LIMIT_KIB = 227


def run_deviceless(*argv: str) -> subprocess.CompletedProcess:
    folder = os.environ.get("DPFP_CUDA_COMPILER")
    if not folder:
        pytest.skip("needs XLA's CUDA compiler: `make test-all` installs it and sets DPFP_CUDA_COMPILER")
    path = os.pathsep.join(p for p in (str(Path(folder).resolve()), str(REPO_ROOT)) if p)
    # Compiled as the GPU machine compiles: without `make test`'s unoptimised-code flag, which
    # reaches the kernels' PTX too (it changes their spills).
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_backend_optimization_level" not in f)
    return subprocess.run([sys.executable, *argv], cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": path, "XLA_FLAGS": flags},
                          capture_output=True, text=True, timeout=900)


def report_rows(stdout: str) -> list[dict]:
    rows = []
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].startswith("fast_weight_"):
            rows.append(dict(name=cells[0], rule=cells[1], key_dim=int(cells[2]), programs=cells[3],
                             warps=cells[4], stages=cells[5], shared_kib=int(cells[6]), registers=int(cells[7]),
                             spill_stores=int(cells[8]), spill_loads=int(cells[9]), verdict=cells[10]))
    return rows


def ptxas_version(text: str) -> str:
    return re.search(r"ptxas ([\d.]+)", text).group(1)


def assert_within_h200_limits(row: dict) -> None:
    assert row["shared_kib"] <= SHARED_LIMIT_KIB and row["registers"] <= 255, row
    # Some spilling is expected (docs/reports/triton_report_h200.md); a whole state slice spilled
    # ([512, 32] float32 is 64 KiB) would not be.
    assert row["spill_stores"] <= 8 * 1024, row


def test_the_fused_chunk_kernel_compiles_for_h200_as_its_report_says():
    # impl="pallas"'s kernel from one chunk on, the one nearest the limits (its backward holds
    # 48 KiB of shared memory and spills); checked against the report's bfloat16 rows, so a kernel
    # change that moves its resources fails until `make triton-report` is rerun.
    result = run_deviceless("-m", "benchmarks.triton_report", "--kernels", "fused_chunk", "--keys", "128",
                            "--rules", "delta")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    got = report_rows(result.stdout)
    assert sorted(r["name"] for r in got) == ["fast_weight_fused_chunk_bwd", "fast_weight_fused_chunk_fwd"]
    report = REPORT.read_text()
    bfloat16_table = report[report.index("## bfloat16 inputs"):].split("\n## ", 1)[0]
    want = {(r["name"], r["rule"], r["key_dim"]): r for r in report_rows(bfloat16_table)}
    same_ptxas = ptxas_version(result.stdout) == ptxas_version(bfloat16_table)
    for row in got:
        assert_within_h200_limits(row)
        reported = want[row["name"], "delta", 128]
        if same_ptxas:
            assert row == reported, (row, reported)
        else:  # registers and spills are ptxas's; the launch settings are XLA's and Triton's
            keys = ("programs", "warps", "stages", "shared_kib")
            assert {k: row[k] for k in keys} == {k: reported[k] for k in keys}, (row, reported)


@SLOW
@pytest.mark.parametrize("kernel, key_dim", [("fused_chunk", 384), ("fused_chunk", 512),
                                             ("chunk_recurrence", 128),
                                             ("chunk_recurrence", 512), ("fused_recurrent", 1024)])
def test_kernels_compile_for_h200_through_xla(kernel, key_dim):
    result = run_deviceless("-m", "benchmarks.triton_report", "--kernels", kernel, "--keys", str(key_dim),
                            "--rules", "delta")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = report_rows(result.stdout)
    assert sorted(r["name"].rsplit("_", 1)[-1] for r in rows) == ["bwd", "fwd"], result.stdout
    for row in rows:
        assert_within_h200_limits(row)


@SLOW
@pytest.mark.parametrize("kernel, key_dim, kernels", [
    # The fused chunk kernel at K = 384 (six key tiles), with the gate's gradient in its backward.
    ("fused_chunk", 384, ["fast_weight_fused_chunk_bwd", "fast_weight_fused_chunk_fwd"]),
    ("fused_recurrent", 1024, ["fast_weight_fused_recurrent_gated_bwd", "fast_weight_fused_recurrent_gated_fwd"]),
    # The gated walk's backward runs the forward walk again for the chunks' start states.
    ("chunk_recurrence", 128, ["fast_weight_chunk_recurrence_bwd", "fast_weight_chunk_recurrence_fwd",
                               "fast_weight_chunk_recurrence_fwd__1"]),
])
def test_gated_kernels_compile_for_h200_through_xla(kernel, key_dim, kernels):
    result = run_deviceless("-m", "benchmarks.triton_report", "--kernels", kernel, "--keys", str(key_dim),
                            "--rules", "delta", "--gated")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = report_rows(result.stdout)
    assert sorted(r["name"] for r in rows) == kernels, result.stdout
    for row in rows:
        assert_within_h200_limits(row)
        if kernel == "fused_recurrent":  # the others spill (docs/reports/triton_report_h200.md)
            assert row["spill_stores"] == 0, row


@SLOW
@pytest.mark.parametrize("kernel", ["fused_chunk", "fused_recurrent"])
def test_fused_kernels_with_dpfp_on_chip_compile_for_h200(kernel):
    # The kernel reading q, k at d = 64 and computing DPFP-3 (K = 384) on chip, forward and backward.
    result = run_deviceless("-m", "benchmarks.triton_report", "--kernels", kernel, "--keys", "64",
                            "--rules", "delta", "--dpfp-nu", "3")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = report_rows(result.stdout)
    # The chunk kernel's backward with features is two kernels (fused_chunk.py's _scores_kernel).
    want_kernels = ["bwd", "fwd", "scores"] if kernel == "fused_chunk" else ["bwd", "fwd"]
    assert sorted(r["name"].rsplit("_", 1)[-1] for r in rows) == want_kernels, result.stdout
    for row in rows:
        assert_within_h200_limits(row)
    if kernel == "fused_chunk":
        # The chunk kernel's spills, the measure of fitting: as its report section says
        # (with the same ptxas), so a change that spills more fails until the report is rerun.
        report = REPORT.read_text()
        section = report[report.index("## DPFP computed on chip"):].split("\n## ", 1)[0]
        want = {r["name"]: r for r in report_rows(section) if r["rule"] == "delta"}
        for row in rows:
            if ptxas_version(result.stdout) == ptxas_version(section):
                assert row == want[row["name"]], (row, want[row["name"]])
            else:
                assert row["spill_stores"] <= want[row["name"]]["spill_stores"] + 512, row


@SLOW
def test_deviceless_compile_fails_where_shared_memory_runs_out():
    # Two load stages at K = 384 need more than an H200 program's 227 KiB (gpu.py's fits_on_chip).
    result = run_deviceless("-m", "benchmarks.triton_report", "--kernels", "fused_chunk", "--keys", "384",
                            "--rules", "delta", "--fused-chunk-stages", "2")
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    requested = re.search(r"Shared memory size limit exceeded: requested (\d+), available: (\d+)", result.stdout)
    assert requested and int(requested.group(1)) > int(requested.group(2)) == SHARED_LIMIT_KIB * 1024, result.stdout


@SLOW
def test_gpu_training_memory_does_not_grow_with_t_k_v():
    # Compiled for an H200: the oracle's autodiff keeps every state (T * H * K * V floats, 268 MB
    # here); scan and the fused chunk kernel recompute them, the chunk form keeps one per chunk
    # (1/64 of them) beside [T, K]-sized work arrays.
    result = run_deviceless("tests/scripts/deviceless_memory_script.py")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    temp = {}
    for line in result.stdout.splitlines():
        impl, size, *kernels = line.split()
        temp[impl] = (int(size), kernels)
    states = 4096 * 2 * 128 * 64 * 4
    assert temp["reference"][0] >= states
    for impl in ("scan", "chunk", "pallas"):
        assert temp[impl][0] < states / 4, (impl, temp)
    assert temp["pallas"][1] == ["fast_weight_fused_chunk_bwd,fast_weight_fused_chunk_fwd"]


def table_rows(stdout: str) -> dict[str, list[str]]:
    """A benchmark's markdown table rows by their first cell."""
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in stdout.splitlines() if line.startswith("| "))}


@SLOW
def test_the_dpfp_attention_step_with_the_map_on_chip_compiles_for_h200():
    # benchmarks/gpu.py --deviceless --features at a small shape (d = 64, nu = 3: K = 384): the
    # step compiles with impl chunk and pallas, and with the map in the op (the Pallas kernels then
    # map q, k on chip) each impl's compiled peak is below its step given phi(q), phi(k).
    result = run_deviceless("-m", "benchmarks.gpu", "--deviceless", "--features", "--feature-shape", "1,128,2,64,3")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = table_rows(result.stdout)
    for impl in ("chunk", "pallas"):
        layer, op = (rows[f"{impl}, map in the {where}"] for where in ("layer", "op"))
        assert float(op[1]) < float(layer[1]), result.stdout  # peak MB
