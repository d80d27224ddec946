"""The chunkwise-parallel op against the scan, the oracle and jax-linear-attention's chunked deltanet.

Float32, delta rule, B=2, T=2048, H=4, V=64, K in {128, 256, 384, 512}: forward and
forward+backward time (interleaved rounds, median) and compiled temp memory, as ratios to our
``chunk``. ``--crossover`` instead times chunk against scan over T and K, the data behind
``impl="auto"``'s choice on this platform.

    python -m benchmarks.chunk                # the K sweep
    python -m benchmarks.chunk --quick        # K = 128 only
    python -m benchmarks.chunk --crossover    # chunk vs scan, T in {64, 256, 1024, 4096}
"""

from __future__ import annotations

import argparse

from benchmarks.common import delta_rule_inputs, machine_name, measure_forward_backward, peer_deltanet, print_table
from dpfp_devtools.workloads import ours


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="K = 128 only")
    parser.add_argument("--crossover", action="store_true", help="chunk vs scan over T and K")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=64)
    args = parser.parse_args(argv)
    batch, heads, value_dim = 2, 4, 64
    print(f"machine: {machine_name()}")

    if args.crossover:
        fns = {"chunk": ours("chunk", chunk_size=args.chunk_size), "scan": ours("scan")}
        print(f"\n# chunk vs scan, delta rule, float32, B={batch}, H={heads}, V={value_dim}\n")
        print("| T | K | chunk fwd ms | scan fwd ms | chunk fwd+bwd ms | scan fwd+bwd ms | scan / chunk (fwd+bwd) |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for key_dim in (128, 512):
            for length in (64, 256, 1024, 4096):
                inputs = delta_rule_inputs(batch, length, heads, key_dim, value_dim)
                rows = measure_forward_backward(fns, inputs, args.repeats)
                (cf, cb, _, _), (sf, sb, _, _) = rows["chunk"], rows["scan"]
                print(f"| {length} | {key_dim} | {cf:.2f} | {sf:.2f} | {cb:.2f} | {sb:.2f} | {sb / cb:.2f}x |")
        return

    fns = {"chunk": ours("chunk", chunk_size=args.chunk_size), "scan": ours("scan"),
           "reference": ours("reference")}
    peer, note = peer_deltanet("chunked")
    if peer is None:
        print(f"note: {note}")
    else:
        fns["jla chunked"] = peer
    length = 2048
    for key_dim in (128,) if args.quick else (128, 256, 384, 512):
        inputs = delta_rule_inputs(batch, length, heads, key_dim, value_dim)
        print(f"\n## delta rule, float32, B={batch}, T={length}, H={heads}, K={key_dim}, V={value_dim}, "
              f"chunk_size={args.chunk_size}\n")
        print_table(measure_forward_backward(fns, inputs, args.repeats), baseline="chunk")


if __name__ == "__main__":
    main()
