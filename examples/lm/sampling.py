"""Decoding bytes from a trained ``ByteLM``: the fast weights' recurrent cache, constant work per byte."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .models import ByteLM


def generate(model: ByteLM, params, prompt: bytes, num_bytes: int, temperature: float = 0.0,
             seed: int = 0) -> bytes:
    """Decode ``num_bytes`` after ``prompt``: greedy at temperature 0, else sampled.

    Fast-weight models run with ``decode=True``: the memory lives in the ``cache`` collection
    and each new byte costs the same. Softmax attention re-runs the growing context.
    """
    if not prompt:
        raise ValueError("prompt must hold at least one byte")
    if num_bytes < 0:
        raise ValueError(f"num_bytes must be at least 0; got {num_bytes}")
    if not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature must be at least 0; got {temperature}")
    tokens = jnp.asarray(np.frombuffer(prompt, np.uint8).astype(np.int32))[None]
    key = jax.random.key(seed)

    def pick(logits, key):
        if temperature == 0:
            return jnp.argmax(logits, axis=-1)
        return jax.random.categorical(key, logits / temperature, axis=-1)

    out = []
    if model.attention == "softmax":
        full = jax.jit(lambda p, t: model.apply({"params": p}, t)[0][:, -1])
        for _ in range(num_bytes):
            key, sub = jax.random.split(key)
            nxt = pick(full(params, tokens), sub)
            out.append(int(nxt[0]))
            tokens = jnp.concatenate([tokens, nxt[:, None]], axis=1)
        return bytes(out)

    decoder = model.clone(decode=True, context_axis=None)  # one token a step: nothing to split
    cache = decoder.init(jax.random.key(0), tokens[:, :1])["cache"]

    @jax.jit
    def step(cache, chunk):
        (logits, _), updates = decoder.apply({"params": params, "cache": cache}, chunk, mutable=["cache"])
        return updates["cache"], logits[:, -1]

    cache, logits = step(cache, tokens)  # the whole prompt in one call
    for _ in range(num_bytes):
        key, sub = jax.random.split(key)
        nxt = pick(logits, sub)
        out.append(int(nxt[0]))
        cache, logits = step(cache, nxt[:, None])
    return bytes(out)
