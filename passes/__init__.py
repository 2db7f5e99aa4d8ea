"""Graph passes over ``torch.fx`` (installed as ``djpq_compiler.passes``).

One pass per file, named after it. A pass is a plain function ``name(gm, ...)`` returning torch's
``PassResult(graph_module, modified)`` or :class:`~djpq_compiler.passes.pipeline.Recorded`
``(graph_module, record)`` when it hands the next passes a value; what a pass needs from an
earlier one is an argument, never a ``gm.meta`` entry. ``prepare`` and ``convert`` run their
passes through :class:`~djpq_compiler.passes.pipeline.PassRunner`. Helpers that are not passes
live in subpackages: ``dependency/`` (the channel rules behind ``dependency_analysis``) and
``lowering/`` (integer layer and pool construction behind ``to_integer``).
"""
