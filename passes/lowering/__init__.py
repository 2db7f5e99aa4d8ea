"""Helpers of the ``to_integer`` pass (not passes themselves: they take one node, not a graph).

* :mod:`.layers`: integer conv/linear construction (weight codes, folded BN and gate factors,
  dyadic requantization multipliers, the int32 bias bound).
* :mod:`.pools`: integer pooling modules and exact window sums.

They live apart from ``passes/`` top level, where every file is one pass named after its file.
"""
