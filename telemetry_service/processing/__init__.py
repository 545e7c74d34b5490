"""The ingest watcher: raw events -> device counters, identity, projections, in one transaction."""
