"""Versioned schemas, one module per store: each a list of (version, statements), applied in
order at start by the store itself, recorded in a `schema_version` table."""

from __future__ import annotations


class SchemaTooNew(Exception):
    """The database was upgraded by a newer proxy than this one."""

    def __init__(self, found: int, known: int) -> None:
        super().__init__(f"the store's schema is version {found}, newer than this proxy knows ({known}): "
                         "run the newer proxy, or restore a backup made before the upgrade")
