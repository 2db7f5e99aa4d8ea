"""Test utilities for users and CI: random architectures (hypothesis strategies) and the
properties every network the compiler accepts must satisfy.

Requires the ``test`` extra (``pip install 'djpq-compiler[test]'``) for hypothesis.
"""

from __future__ import annotations

from djpq_compiler.testing.graphs import Recipe, build, example_input, recipes
from djpq_compiler.testing.properties import (
    PropertyViolation,
    check_analysis,
    check_convert,
    check_prepare,
    check_signs,
    check_tvm,
)

__all__ = ["Recipe", "build", "example_input", "recipes", "PropertyViolation", "check_analysis",
           "check_prepare", "check_convert", "check_signs", "check_tvm"]
