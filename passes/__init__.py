"""Graph passes over ``torch.fx`` (installed as ``djpq_compiler.passes``).

One pass per file; each is a plain function ``name(gm, ...) -> PassResult``.
"""
