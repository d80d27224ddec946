"""One training step of the paper-figures sweep's retrieval model: the op's final state against the direct readout.

``examples/associative_retrieval.py``'s ``RetrievalModel`` needs only each sequence's final fast
weights W read by the queries, never the op's per-step outputs. ``via_op=True`` computes W with
``dj.fast_weight`` (impl "auto"; FWM: the op on one step at a time) and reads it; the default
computes the same readout without W's per-step history (``sum_rule_readout``,
``delta_rule_readout``, ``fwm_memory``). This times both, interleaved, on the sweep's most
expensive points, under the authors' protocol (batch 32, one training query per sequence):

- a training step (loss, gradient, Adam update; one batch, already drawn), jitted;
- the loss alone (the forward), jitted: what is left of the step is the backward and the update;
- an evaluation (20 sequences of S pairs, every distinct key they hold, at most 200).

    python -m benchmarks.retrieval_step             # setting 1 DPFP-3 S=400, setting 2 DPFP-2 delta S=200, FWM S=100
    python -m benchmarks.retrieval_step --repeats 5
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax

from benchmarks.common import reported_run, time_interleaved_ms
from examples import associative_retrieval as ar

# (setting, feature map, rule, nu, S): the sweep's costliest points of each kind.
POINTS = ((1, "dpfp", "sum", 3, 400), (2, "dpfp", "delta", 2, 200), (2, "dpfp", "fwm", 1, 100))


def step_functions(config: ar.RunConfig, via_op: bool, seed: int = 0) -> dict:
    """Jitted (train step, loss, evaluation) of one form, closed over one batch of each kind."""
    model = ar.RetrievalModel(config.num_symbols, config.feature_map, config.rule, config.nu, paper_init=True,
                              via_op=via_op)
    rng = np.random.default_rng(seed)
    batch = ar.make_paper_train_batch(rng, config.setting, config.num_symbols, config.batch_size)
    eval_batch = ar.make_paper_eval_batch(rng, config.setting, config.num_symbols, config.eval_sequences)
    params = model.init(jax.random.key(seed), batch.keys, batch.values, batch.queries)["params"]
    optimizer = optax.adam(config.learning_rate)
    opt_state = optimizer.init(params)

    def loss_fn(params, batch):
        readout = model.apply({"params": params}, batch.keys, batch.values, batch.queries)
        return ar.retrieval_loss(readout, batch.targets, batch.valid)

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    loss = jax.jit(loss_fn)
    return {"train step": lambda: train_step(params, opt_state, batch), "loss (forward)": lambda: loss(params, batch),
            "evaluation": lambda: loss(params, eval_batch)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (the median is printed)")
    args = parser.parse_args()
    with reported_run():
        print("\n| setting | method | S | what | via the op ms | direct ms | op / direct |")
        print("|---:|---|---:|---|---:|---:|---:|")
        for setting, feature_map, rule, nu, size in POINTS:
            config = ar.paper_config(setting, feature_map, rule, size, nu)
            forms = {via_op: step_functions(config, via_op) for via_op in (True, False)}
            for what in forms[True]:
                ms = time_interleaved_ms({"op": forms[True][what], "direct": forms[False][what]},
                                         repeats=args.repeats)
                print(f"| {setting} | {config.label} | {size} | {what} | {ms['op']:.1f} | {ms['direct']:.1f} "
                      f"| {ms['op'] / ms['direct']:.1f}x |", flush=True)
        print()


if __name__ == "__main__":
    main()
