"""The chunkwise-parallel op against the scan, the oracle and jax-linear-attention's chunked deltanet.

Float32, delta rule, B=2, T=2048, H=4, V=64, K in {128, 256, 384, 512}: forward and
forward+backward time (interleaved rounds, median) and compiled temp memory, as ratios to our
``chunk``. ``--crossover`` instead times chunk against scan over T and K, the data behind
``impl="auto"``'s choice on this platform.

    python -m benchmarks.chunk                # the K sweep
    python -m benchmarks.chunk --quick        # K = 128 only
    python -m benchmarks.chunk --crossover    # chunk vs scan, T in {64, 256, 1024, 4096}
    python -m benchmarks.chunk --packed       # packed documents: with segment ids vs without
    python -m benchmarks.chunk --loss outputs # any of the above with a loss on the outputs alone
    python -m benchmarks.chunk --spans        # chunk at several span sizes (its unit of recomputation)
    python -m benchmarks.chunk --features     # the feature map inside the op against before it (d = 64)
    python -m benchmarks.chunk --gate --loss outputs  # gated chunk vs ungated and vs jla's gated deltanet

``--loss``: what the timed gradient is of, the sum of the outputs and the final state (the default)
or of the outputs alone, as in training; jax-linear-attention then runs without a final state.

``--packed``: K in {128, 512}, each row packs documents of random lengths (mean ``--doc-length``,
starting anywhere in a chunk); ``chunk`` and ``scan`` with those segment ids against ``chunk``
without them, and jax-linear-attention's chunked deltanet with and without the same ids. The
outputs of each packed contender are checked against our reference first.

``--features``: raw q, k of width d = 64 and DPFP-nu with sum normalisation, nu in {1, 3} (K = 128,
384): ``chunk`` given ``features=dj.Features(...)`` (the map inside the op, its backward keeping
q, k at width d) against ``chunk`` given phi(q), phi(k) (the map applied before it, as the layers
did), the forward+backward including the map's; the fused results are checked against the
unfused ones first.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    delta_rule_inputs,
    measure_forward_backward,
    peer_deltanet,
    peer_gated_deltanet,
    print_table,
    reported_run,
)
from dpfp_devtools.workloads import LOSSES, ours, with_features, worst_relative_error


def packed_segment_ids(batch: int, length: int, mean_length: int, seed: int = 0) -> jnp.ndarray:
    """``[B, T]`` ids of documents with geometric lengths of the given mean, numbered from 0 per row."""
    rng = np.random.default_rng(seed)
    starts = rng.random((batch, length)) < 1.0 / mean_length
    starts[:, 0] = False
    return jnp.asarray(np.cumsum(starts, axis=1, dtype=np.int32))


def packed(args: argparse.Namespace, batch: int, heads: int, value_dim: int) -> None:
    length = 2048
    segment_ids = packed_segment_ids(batch, length, args.doc_length)
    documents = int(segment_ids[:, -1].sum()) + batch
    fns = {"chunk": ours("chunk", chunk_size=args.chunk_size),
           "chunk packed": ours("chunk", chunk_size=args.chunk_size, segment_ids=segment_ids),
           "scan packed": ours("scan", segment_ids=segment_ids)}
    final_state = args.loss != "outputs"
    peer, note = peer_deltanet("chunked", final_state=final_state)
    if peer is None:
        print(f"note: {note}")
    else:
        fns["jla chunked"] = peer
        fns["jla chunked packed"] = peer_deltanet("chunked", final_state=final_state, segment_ids=segment_ids)[0]
    for key_dim in (128,) if args.quick else (128, 512):
        inputs = delta_rule_inputs(batch, length, heads, key_dim, value_dim)
        want = ours("reference", segment_ids=segment_ids)(*inputs)
        errors = ", ".join(f"{name} {worst_relative_error(fn(*inputs), want):.1e}"
                           for name, fn in fns.items() if "packed" in name)
        print(f"\n## packed documents: delta rule, float32, B={batch}, T={length}, H={heads}, K={key_dim}, "
              f"V={value_dim}, chunk_size={args.chunk_size}, {documents} documents (mean length "
              f"{batch * length / documents:.0f}), loss on {args.loss}\n\n"
              f"relative error against the reference: {errors}\n")
        print_table(measure_forward_backward(fns, inputs, args.repeats, args.loss), baseline="chunk")


def span_sizes(args: argparse.Namespace, batch: int, heads: int, value_dim: int) -> None:
    """``chunk``'s forward+backward at span sizes from one chunk to the whole sequence, K in {128, 512}."""
    from dpfp_jax.ops.fast_weight import fast_weight_chunk
    from dpfp_jax.ops.fast_weight.chunk import DEFAULT_SPAN_SIZE
    from dpfp_jax.ops.fast_weight.common import zero_state

    def at(span_size):
        def fn(q, k, v, beta):
            return fast_weight_chunk(q, k, v, beta, zero_state(q, v, jnp.float32), rule="delta", scale=1.0,
                                     chunk_size=args.chunk_size, span_size=span_size)

        return fn

    length = 2048
    sizes = [s for s in (64, 128, 256, 512, 1024, 2048) if s >= args.chunk_size]
    fns = {f"span {s}" + (" (default)" if s == DEFAULT_SPAN_SIZE else ""): at(s) for s in sizes}
    for key_dim in (128,) if args.quick else (128, 512):
        inputs = delta_rule_inputs(batch, length, heads, key_dim, value_dim)
        print(f"\n## chunk by span size: delta rule, float32, B={batch}, T={length}, H={heads}, K={key_dim}, "
              f"V={value_dim}, chunk_size={args.chunk_size}, loss on {args.loss}\n")
        rows = measure_forward_backward(fns, inputs, args.repeats, args.loss)
        print_table(rows, baseline=next(n for n in fns if "default" in n))


def features(args: argparse.Namespace, batch: int, heads: int, value_dim: int) -> None:
    import dpfp_jax as dj

    length, dim = 2048, 64
    raw = delta_rule_inputs(batch, length, heads, dim, value_dim)
    for nu in (1,) if args.quick else (1, 3):
        phi = dj.Features("dpfp", dim=dim, nu=nu, normalization="sum")
        fns = {"chunk, map before the op": with_features("chunk", phi, fused=False, chunk_size=args.chunk_size),
               "chunk, map inside the op": with_features("chunk", phi, fused=True, chunk_size=args.chunk_size)}
        error = worst_relative_error(*(fn(*raw) for fn in fns.values()))
        print(f"\n## feature map inside the op: delta rule, float32, B={batch}, T={length}, H={heads}, d={dim}, "
              f"DPFP nu={nu} + sum normalisation (K={phi.key_dim}), V={value_dim}, chunk_size={args.chunk_size}, "
              f"loss on {args.loss}\n\nrelative difference of the results: {error:.1e}\n")
        print_table(measure_forward_backward(fns, raw, args.repeats, args.loss), baseline="chunk, map before the op")


def gated(args: argparse.Namespace, batch: int, heads: int, value_dim: int) -> None:
    """Gated fast weights (``log_decay``, alpha mostly in 0.5..1): our gated ``chunk`` and ``scan``
    against the ungated ``chunk`` and jax-linear-attention's chunked Gated DeltaNet (plain JAX,
    its gate applied as ours, before the write), K = 128. All take (q, k, v, beta, log_decay) and
    are differentiated with respect to all five (the ungated one ignores log_decay). The gated
    contenders' outputs are checked against our gated reference first."""
    from jax import nn as jnn

    length, key_dim = 2048, 128
    final_state = args.loss != "outputs"

    def ours_gated(impl, gate=True):
        def fn(q, k, v, beta, log_decay):
            return ours(impl, chunk_size=args.chunk_size, **({"log_decay": log_decay} if gate else {}))(q, k, v, beta)

        return fn

    fns = {"chunk": ours_gated("chunk", gate=False), "chunk gated": ours_gated("chunk"),
           "scan gated": ours_gated("scan")}
    peer, note = peer_gated_deltanet(final_state=final_state, scale=1.0)
    if peer is None:
        print(f"note: {note}")
    else:
        fns["jla chunked gated"] = peer
    q, k, v, beta = delta_rule_inputs(batch, length, heads, key_dim, value_dim)
    log_decay = -0.5 * jnn.softplus(jnp.asarray(np.random.default_rng(0).normal(size=(batch, length, heads)),
                                                jnp.float32))
    inputs = (q, k, v, beta, log_decay)
    want = ours_gated("reference")(*inputs)
    errors = ", ".join(f"{name} {worst_relative_error(fn(*inputs)[0], want[0]):.1e}"
                       for name, fn in fns.items() if "gated" in name)
    print(f"\n## gated: delta rule, float32, B={batch}, T={length}, H={heads}, K={key_dim}, V={value_dim}, "
          f"chunk_size={args.chunk_size}, loss on {args.loss}\n\n"
          f"outputs' relative error against our gated reference: {errors}\n")
    print_table(measure_forward_backward(fns, inputs, args.repeats, args.loss), baseline="chunk")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="K = 128 only")
    parser.add_argument("--crossover", action="store_true", help="chunk vs scan over T and K")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--packed", action="store_true", help="packed documents: with segment ids vs without")
    parser.add_argument("--doc-length", type=int, default=300, help="mean document length for --packed")
    parser.add_argument("--spans", action="store_true", help="chunk at several span sizes")
    parser.add_argument("--features", action="store_true", help="the feature map inside the op vs before it")
    parser.add_argument("--loss", choices=LOSSES, default=LOSSES[0], help="what the timed gradient is of")
    parser.add_argument("--gate", action="store_true", help="gated chunk vs ungated and vs jla's gated deltanet")
    args = parser.parse_args(argv)
    batch, heads, value_dim = 2, 4, 64
    if args.gate:
        gated(args, batch, heads, value_dim)
        return
    if args.packed:
        packed(args, batch, heads, value_dim)
        return
    if args.spans:
        span_sizes(args, batch, heads, value_dim)
        return
    if args.features:
        features(args, batch, heads, value_dim)
        return

    if args.crossover:
        fns = {"chunk": ours("chunk", chunk_size=args.chunk_size), "scan": ours("scan")}
        print(f"\n# chunk vs scan, delta rule, float32, B={batch}, H={heads}, V={value_dim}, loss on {args.loss}\n")
        print("| T | K | chunk fwd ms | scan fwd ms | chunk fwd+bwd ms | scan fwd+bwd ms | scan / chunk (fwd+bwd) |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for key_dim in (128, 512):
            for length in (64, 256, 1024, 4096):
                inputs = delta_rule_inputs(batch, length, heads, key_dim, value_dim)
                rows = measure_forward_backward(fns, inputs, args.repeats, args.loss)
                (cf, cb, _, _), (sf, sb, _, _) = rows["chunk"], rows["scan"]
                print(f"| {length} | {key_dim} | {cf:.2f} | {sf:.2f} | {cb:.2f} | {sb:.2f} | {sb / cb:.2f}x |")
        return

    fns = {"chunk": ours("chunk", chunk_size=args.chunk_size), "scan": ours("scan"),
           "reference": ours("reference")}
    peer, note = peer_deltanet("chunked", final_state=args.loss != "outputs")
    if peer is None:
        print(f"note: {note}")
    else:
        fns["jla chunked"] = peer
    length = 2048
    for key_dim in (128,) if args.quick else (128, 256, 384, 512):
        inputs = delta_rule_inputs(batch, length, heads, key_dim, value_dim)
        print(f"\n## delta rule, float32, B={batch}, T={length}, H={heads}, K={key_dim}, V={value_dim}, "
              f"chunk_size={args.chunk_size}, loss on {args.loss}\n")
        print_table(measure_forward_backward(fns, inputs, args.repeats, args.loss), baseline="chunk")


if __name__ == "__main__":
    with reported_run():
        main()
