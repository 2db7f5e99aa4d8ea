"""Channel dependency analysis (installed as ``djpq_compiler.passes.dependency``)."""

from djpq_compiler.passes.dependency.analyze import (
    DependencyResult,
    analyze_graph,
    dependency_analysis,
)
from djpq_compiler.passes.dependency.groups import ChannelGroup, Member
from djpq_compiler.passes.dependency.rules import RULES
from djpq_compiler.passes.dependency.state import Role

__all__ = [
    "ChannelGroup",
    "DependencyResult",
    "Member",
    "RULES",
    "Role",
    "analyze_graph",
    "dependency_analysis",
]
