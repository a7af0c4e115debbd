"""Plain-text tables for the console and Markdown docs (no dependency).

The formatter lives in :mod:`muonlab._tables` (below layer 3, so the routing report can use it
without importing the lab); this module re-exports it for the lab's own imports.
"""

from __future__ import annotations

from .._tables import _fmt, format_table

__all__ = ["_fmt", "format_table"]
