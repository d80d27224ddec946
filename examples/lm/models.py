"""``ByteLM``: bytes in, next-byte logits out, over a DPFPformer or Flax's causal softmax attention."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

import dpfp_jax as dj

ATTENTIONS = ("dpfp", "linear", "favor", "softmax")


class SoftmaxBlock(nn.Module):
    """Pre-norm block with Flax's causal multi-head softmax attention: the baseline."""

    heads: int
    head_dim: int
    ff_dim: int

    @nn.compact
    def __call__(self, x, segment_ids=None):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], bool))
        if segment_ids is not None:  # packed documents: each attends only within itself
            mask = nn.combine_masks(mask, nn.make_attention_mask(segment_ids, segment_ids, jnp.equal))
        h = nn.MultiHeadDotProductAttention(self.heads, qkv_features=self.heads * self.head_dim)(
            nn.LayerNorm()(x), mask=mask
        )
        x = x + h
        return x + nn.Dense(x.shape[-1])(nn.relu(nn.Dense(self.ff_dim)(nn.LayerNorm()(x))))


class ByteLM(nn.Module):
    """Bytes in, next-byte logits out. ``__call__(tokens, memory=None, segment_ids=None)`` ->
    ``(logits, memory)``; ``segment_ids [B, T]`` packs documents (no byte sees another document's).
    ``context_axis`` names the mesh axis (of an Auto mesh, ``jax.set_mesh``) that shards the
    sequence: context parallelism, passed to every fast-weight layer."""

    attention: str = "dpfp"
    rule: str = "delta"
    nu: int = 1
    num_features: int = 64
    depth: int = 2
    dim: int = 64
    heads: int = 4
    head_dim: int = 16
    ff_dim: int = 256
    impl: str = "auto"
    decode: bool = False
    context_axis: str | None = None
    gate: str | None = None  # "gated_deltanet": the layers' decay gate (delta rule)

    @nn.compact
    def __call__(self, tokens, memory=None, segment_ids=None):
        x = nn.Embed(256, self.dim)(tokens)
        if self.attention == "softmax":
            for _ in range(self.depth):
                x = SoftmaxBlock(self.heads, self.head_dim, self.ff_dim)(x, segment_ids)
            x = nn.LayerNorm()(x)
        else:
            x, memory = dj.DPFPformer(
                self.dim, self.depth, num_heads=self.heads, head_dim=self.head_dim, nu=self.nu,
                feature_map="linear" if self.attention == "linear" else self.attention, rule=self.rule,
                # The delta rule's layers sum-normalise phi(q), phi(k); the sum rule's use the classic
                # linear-transformer denominator.
                normalization="sum" if self.rule == "delta" else "attention",
                num_features=self.num_features, ff_mult=max(1, self.ff_dim // self.dim), impl=self.impl,
                decode=self.decode, context_axis=self.context_axis, gate=self.gate, name="transformer",
            )(x, memory, segment_ids=segment_ids, return_memory=True)
        return nn.Dense(256, name="head")(x), memory


def cross_entropy(logits, targets):
    """Mean next-byte cross entropy in nats, computed in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def sequence_sharded(x, model: ByteLM):
    """``x [B, T, ...]`` with T sharded over the model's ``context_axis`` (the batch left as it
    is), so that the embedding and every activation after it hold a slice of the sequence; as it
    is without one."""
    if model.context_axis is None:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(PartitionSpec.UNCONSTRAINED, model.context_axis))


def apply_lm(model: ByteLM, params, windows, memory=None, segment_ids=None):
    """``(logits, memory)`` of ``windows [B, T + 1]``'s first T bytes, each predicting the next;
    ``segment_ids`` (None, or ``[B, T + 1]`` like the windows) packs documents. With the model's
    ``context_axis`` the T bytes (and ids) are sharded over it: the windows' T + 1 cannot be."""
    ids = None if segment_ids is None else sequence_sharded(segment_ids[:, :-1], model)
    return model.apply({"params": params}, sequence_sharded(windows[:, :-1], model), memory, segment_ids=ids)
