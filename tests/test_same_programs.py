"""dpfp_devtools.same_programs: a table measured at an earlier commit stands while its programs lower
to the same module; the digest must ignore where the code sits and see any change of the program."""

import jax
import jax.numpy as jnp

from dpfp_devtools.same_programs import digest


def lowered(fn) -> str:
    return jax.jit(fn).lower(jnp.ones((4, 3))).as_text(debug_info=True)


def test_the_digest_ignores_source_locations_and_sees_a_changed_program():
    first = lowered(lambda x: jnp.tanh(x) @ x.T)

    def moved(x):  # the same program, written on other lines

        return jnp.tanh(x) @ x.T

    assert "loc(" in first  # locations are there to be ignored
    assert digest(lowered(moved)) == digest(first)
    assert digest(lowered(lambda x: jnp.sin(x) @ x.T)) != digest(first)
    assert digest(lowered(lambda x: jnp.tanh(x) @ x.T * 1.0)) != digest(first)
