"""Storage: what the cabinet remembers (ledger, catalog, their schemas)."""
