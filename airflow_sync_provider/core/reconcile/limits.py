"""How much reconciliation reads or holds at once.

The modules read these as ``limits.NAME`` when they run (not at import), so a test can lower them.
"""

from __future__ import annotations

#: Rows per streamed page (both sides), and differing keys buffered before they are staged.
FETCH_ROWS = 10_000
#: Phase 2: source rows of differing buckets held in memory at once.
GROUP_ROWS = 500_000
#: Repair and key lookups: keys per source query.
KEYS_PER_QUERY = 500

__all__ = ["FETCH_ROWS", "GROUP_ROWS", "KEYS_PER_QUERY"]
