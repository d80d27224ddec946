"""Forward and forward+backward time and compiled temp memory of the fast-weight op.

Compares our ``reference`` (scan + autodiff) and ``scan`` (custom backward) with
jax-linear-attention's ``reference`` and ``chunked`` deltanet on the same delta-rule inputs,
float32, and prints each as a ratio to our ``scan``. Peers that are not installed are skipped
with a note (``pip install -e '.[bench]'`` brings jax-linear-attention).

    python -m benchmarks.ops            # T in {256, 1024, 4096}, K in {128, 256}
    python -m benchmarks.ops --quick    # T in {256, 1024}, K = 128: a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse

from benchmarks.common import (
    delta_rule_inputs,
    measure_forward_backward,
    peer_deltanet,
    print_table,
    reported_run,
)
from dpfp_devtools.workloads import ours


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="T in {256, 1024}, K = 128, fewer repeats")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--value-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    lengths, key_dims = ((256, 1024), (128,)) if args.quick else ((256, 1024, 4096), (128, 256))
    repeats = args.repeats or (3 if args.quick else 5)

    fns = {"ours reference": ours("reference"), "ours scan": ours("scan")}
    notes = []
    for impl in ("reference", "chunked"):
        fn, note = peer_deltanet(impl)
        if fn is None:
            notes.append(note)
        else:
            fns[f"jla {impl}"] = fn
    print(f"# fast_weight delta rule, float32, B={args.batch}, H={args.heads}, V={args.value_dim}")
    for note in sorted(set(notes)):
        print(f"note: {note}")
    for key_dim in key_dims:
        for length in lengths:
            inputs = delta_rule_inputs(args.batch, length, args.heads, key_dim, args.value_dim)
            print(f"\n## T={length}, K={key_dim}\n")
            print_table(measure_forward_backward(fns, inputs, repeats), baseline="ours scan")


if __name__ == "__main__":
    with reported_run():
        main()
