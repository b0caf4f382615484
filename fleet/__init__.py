"""The fleet service (issue 5, not built yet)."""
