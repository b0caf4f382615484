"""Device identity, certificates and flashing (issues 5 and 8, not built yet)."""
