"""Backends lowering converted models (installed as ``djpq_compiler.backends``)."""
