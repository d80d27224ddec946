"""The layers' shared math: what the linen modules (:mod:`dpfp_jax.nn`) and the NNX modules
(:mod:`dpfp_jax.nnx`) compute, written once as pure functions over arrays and plain settings.

Layers import one way: ``nn`` and ``nnx`` each import this package and :mod:`dpfp_jax.ops`; this
package imports neither framework's modules, and ``nn`` and ``nnx`` do not import each other
(``dpfp_jax.nnx.params`` excepted, which maps linen parameters to NNX ones). What stays in the
layers is only what differs between the two: parameters, dropout, variables and caches.

- :mod:`dpfp_jax.core.attention`: the fast-weight attention's settings (:class:`AttentionSpec`),
  features, memories, and the step from the q/k/v/beta projection to the heads' outputs.
- :mod:`dpfp_jax.core.segments`: packed documents in the layers: the attention normalisation's
  running key sum per document, and a decode cache that restarts at a new document.
- :mod:`dpfp_jax.core.cell`: one step of the DPFP cell.
- :mod:`dpfp_jax.core.transformer`: the DPFPformer's settings and per-layer memories.
"""
