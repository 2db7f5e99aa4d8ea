"""``python -m djpq_compiler`` runs the ``djpq`` command line."""

from __future__ import annotations

from djpq_compiler.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
