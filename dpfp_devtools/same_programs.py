"""Whether a benchmark table measured at an earlier commit still describes the code as it is now.

A table of times or memory stays current as long as the programs it measured are unchanged. This
tool lowers the benchmarks' programs (``dj.fast_weight`` forward and forward+backward, through
``dpfp_devtools.workloads`` as the benchmarks call them) with the source of an earlier commit and
with the working tree, and compares the lowered StableHLO modules: equal modules are the same
program for every backend XLA compiles them for (given the same jax and compiler), so the earlier
table's figures stand for the current code. Lowering compiles nothing, so it takes seconds.

    python -m dpfp_devtools.same_programs 6ebb7d4            # the CPU tables' programs
    python -m dpfp_devtools.same_programs 4c6e0e3 --shapes tpu  # the TPU memory report's
    python -m dpfp_devtools.same_programs --record  # the TPU report's chunk programs, for make test

It prints one line per program and exits 1 when any differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# (B, T, H, K, V, dtype) of each benchmark's programs: benchmarks/chunk.py's default shape, and
# benchmarks/tpu.py --deviceless's training shape over its key widths.
SHAPES = {
    "cpu": [(2, 2048, 4, 128, 64, "float32")],
    "tpu": [(8, 4096, 8, key_dim, 64, "bfloat16") for key_dim in (128, 256, 384, 512, 1024)],
}

# Run in a child process whose PYTHONPATH is the tree being described, so that ``dpfp_jax`` and
# ``dpfp_devtools.workloads`` are that tree's. Only names both old and new trees have are used.
CHILD = """
import hashlib, sys
import jax, jax.numpy as jnp
import dpfp_jax as dj
from dpfp_devtools.workloads import forward_and_backward

def program(rule, impl):
    def fn(q, k, v, beta):
        return dj.fast_weight(q, k, v, beta if rule == "delta" else None, rule=rule, impl=impl)
    return fn

for b, t, h, key_dim, value_dim, dtype in SHAPES:
    keys = jax.ShapeDtypeStruct((b, t, h, key_dim), getattr(jnp, dtype))
    values = jax.ShapeDtypeStruct((b, t, h, value_dim), keys.dtype)
    args = (keys, keys, values, jax.ShapeDtypeStruct((b, t, h), keys.dtype))
    for rule in ("delta", "sum"):
        for impl in IMPLS:
            for loss in ("outputs+state", "outputs"):
                forward, backward = forward_and_backward(program(rule, impl), 4, loss=loss)
                programs = {"fwd": forward, "fwd+bwd " + loss: backward} if loss == "outputs+state" else {
                    "fwd+bwd " + loss: backward}
                for name, fn in programs.items():
                    label = f"{rule} {impl} K={key_dim} {dtype} {name}"
                    if ONLY is None or label in ONLY:
                        print(f"{label}\\t{DIGEST(fn.lower(*args).as_text())}", flush=True)
"""


def digest(stablehlo: str) -> str:
    """A hash of a lowered module that ignores what does not change the program: source locations
    (``loc(...)`` attributes and ``#loc`` lines) and the module's name."""
    text = re.sub(r"^#loc.*$", "", stablehlo, flags=re.MULTILINE)
    text = re.sub(r"\s*loc\((?:[^()]|\([^()]*\))*\)", "", text)
    text = re.sub(r"^module @\S+", "module", text, flags=re.MULTILINE)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def program_digests(tree: Path, shapes: list[tuple], impls: tuple[str, ...] = ("scan", "chunk"),
                    only: set[str] | None = None) -> dict[str, str]:
    """Each program's digest, lowered with the source in ``tree`` (``only``: just those labels)."""
    code = (f"import re\nSHAPES = {shapes!r}\nIMPLS = {impls!r}\nONLY = {only!r}\n" + _digest_source()
            + CHILD)
    env = {"PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tree, env=env)
    if done.returncode:
        raise RuntimeError(f"lowering with the source in {tree} failed:\n{done.stderr[-2000:]}")
    return dict(line.split("\t") for line in done.stdout.splitlines() if "\t" in line)


def _digest_source() -> str:
    import inspect

    return "import hashlib\n" + inspect.getsource(digest).replace("def digest(", "def DIGEST(") + "\n"


def compare(commit: str, shapes: list[tuple]) -> dict[str, tuple[str, str]]:
    """{program: (digest at ``commit``, digest in the working tree)}."""
    with tempfile.TemporaryDirectory() as scratch:
        old = Path(scratch) / "tree"
        subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", "--quiet", str(old), commit],
                       check=True)
        try:
            before = program_digests(old, shapes)
        finally:
            subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(old)], check=True)
    now = program_digests(REPO_ROOT, shapes)
    return {name: (before.get(name, "missing"), digest_now) for name, digest_now in now.items()}


# The TPU memory report's `chunk` rows that `make test` holds to today's program: the kernel's
# memory is compiled in `make test` and its ratio to chunk's checked against the report; this
# checks, without compiling the chunk form for TPU, that the report's chunk rows still measure the
# chunk form as it is.
REPORTED_TPU_PROGRAMS = REPO_ROOT / "docs" / "reports" / "tpu_memory_programs.json"
REPORTED_LABELS = {f"delta chunk K={k} bfloat16 fwd+bwd outputs+state" for k in (128, 1024)}


def reported_programs(tree: Path = REPO_ROOT) -> dict[str, str]:
    """The digests of the programs behind the TPU report's chunk rows at K = 128 and 1024."""
    shapes = [shape for shape in SHAPES["tpu"] if shape[3] in (128, 1024)]
    return program_digests(tree, shapes, ("chunk",), REPORTED_LABELS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commit", nargs="?", help="the commit a table was measured at")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--record", action="store_true",
                        help=f"write the digests of the TPU report's chunk programs to {REPORTED_TPU_PROGRAMS.name} "
                             "(after regenerating docs/reports/tpu_memory.md's chunk rows)")
    args = parser.parse_args(argv)
    if args.record:
        REPORTED_TPU_PROGRAMS.write_text(json.dumps(reported_programs(), indent=1, sort_keys=True) + "\n")
        print(f"wrote {REPORTED_TPU_PROGRAMS}")
        return 0
    if args.commit is None:
        parser.error("give the commit a table was measured at (or --record)")
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    results = compare(args.commit, SHAPES[args.shapes])
    print(f"programs of the {args.shapes} tables lowered at {args.commit} and in the working tree (HEAD {head}):")
    for name, (before, now) in results.items():
        print(f"{'same' if before == now else 'DIFFERENT'}  {name}")
    changed = sum(before != now for before, now in results.values())
    print(f"{len(results) - changed} of {len(results)} programs the same")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
