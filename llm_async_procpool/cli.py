"""``llm async-pool``: inspect pools and compare them."""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    @cli.group(name="async-pool")
    def async_pool():
        "Inspect and benchmark the async pool for sync-only models"
