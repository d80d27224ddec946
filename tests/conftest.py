"""Fixtures shared by the test files; shared functions live in ``tests/helpers.py``."""

from __future__ import annotations

import jax
import pytest


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield
