"""dpfp_devtools.same_programs: a table measured at an earlier commit stands while its programs lower
to the same module; the digest must ignore where the code sits and see any change of the program."""

import json

import jax
import jax.numpy as jnp

from dpfp_devtools.same_programs import REPORTED_LABELS, REPORTED_TPU_PROGRAMS, digest, reported_programs


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


def test_the_tpu_memory_reports_chunk_rows_measure_the_chunk_form_as_it_is():
    # make test compiles the TPU kernel and holds its memory, and its ratio to chunk's, to
    # docs/reports/tpu_memory.md; compiling the chunk form for TPU takes minutes, so its rows are
    # held to the program instead: a change of the chunk form's program fails here until the
    # report's chunk rows are regenerated (`make tpu-memory`) and recorded (`--record`).
    recorded = json.loads(REPORTED_TPU_PROGRAMS.read_text())
    assert set(recorded) == REPORTED_LABELS
    assert reported_programs() == recorded, "rerun make tpu-memory, then python -m dpfp_devtools.same_programs --record"
