"""Collectors: one source per file; each builds fresh metric families from the latest snapshot at scrape time."""
