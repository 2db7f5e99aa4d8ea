"""Integer reference executor: the single definition of integer semantics."""
