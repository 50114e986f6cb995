"""The plugin never breaks the host: what it needs, imported here, or why not.

The package registers twins only when this import worked; ``llm async-pool
status`` says why it did not (a dependency or an llm API missing here).
"""

from __future__ import annotations

try:
    from .pools import live_pools, shutdown_pools
    from .twin import AsyncKeyTwin, AsyncTwin, make_twin, prepare_pool
except Exception as error:  # never break the host
    IMPORT_ERROR: Exception | None = error
else:
    IMPORT_ERROR = None

__all__ = [
    "IMPORT_ERROR",
    "AsyncKeyTwin",
    "AsyncTwin",
    "live_pools",
    "make_twin",
    "prepare_pool",
    "shutdown_pools",
]
