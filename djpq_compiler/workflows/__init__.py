"""Workflows built on the compiler: data loaders, reference models, training and fine-tuning,
the ``djpq demo`` / ``djpq compress`` pipelines and their reports.

These are applications of the public API (``prepare``, ``djpq_loss``, ``convert``, the backends);
nothing in the compiler core (``djpq_compiler`` top level, ``ir``, ``passes``, ``backends``)
imports from here (``tests/test_layout.py`` checks it).
"""
