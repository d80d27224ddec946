import jax, jax.numpy as jnp, time
import dpfp_jax as dj
from dpfp_jax.ops.fast_weight.wy import wy_inverse
from pallas_kernels import fused_chunk
from pallas_kernels.triton.dpfp import DPFP
import sys
rule, d, nu, norm, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
B, H, V = 1, 2, 16
ks = jax.random.split(jax.random.key(0), 6)
q = jax.random.normal(ks[0], (B, T, H, d)); k = jax.random.normal(ks[1], (B, T, H, d))
v = jax.random.normal(ks[2], (B, T, H, V)); beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H))) if rule == "delta" else None
K = 2 * nu * d
s0 = 0.1 * jax.random.normal(ks[4], (B, H, K, V))
phi = dj.Features("dpfp", dim=d, nu=nu, normalization=norm)
def ours(q, k, v, beta, s, scale):
    return fused_chunk(q, k, v, beta, s, rule=rule, scale=scale, chunk_size=16, interpret=True,
                       wy_inverse=wy_inverse if rule == "delta" else None, features=DPFP(nu, norm))
def ref(q, k, v, beta, s, scale):
    return dj.fast_weight(phi(q), phi(k), v, beta, rule=rule, initial_state=s, scale=scale, impl="reference")
def loss(f):
    def l(q, k, v, beta, s, scale):
        o, w = f(q, k, v, beta, s, scale)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(w * w)
    return l
args = (q, k, v, beta, s0, 0.7)
t = time.time()
for f in (ours, ref):
    pass
o1, w1 = ours(*args); o2, w2 = ref(*args)
print("out", float(jnp.abs(o1 - o2).max()), "state", float(jnp.abs(w1 - w2).max()))
argn = (0, 1, 2, 4, 5) + ((3,) if rule == "delta" else ())
g1 = jax.grad(loss(ours), argnums=argn)(*args); g2 = jax.grad(loss(ref), argnums=argn)(*args)
for a, b in zip(g1, g2):
    print("grad", float(jnp.abs(a - b).max()), float(jnp.abs(b).max()))
print(time.time() - t)
