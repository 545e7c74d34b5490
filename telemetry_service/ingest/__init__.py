"""POST /ingest: the swamp CLI's events, validated, deduplicated by event id and stored raw."""
