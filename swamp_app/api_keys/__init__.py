"""API keys: issued and revoked with their telemetry command in one transaction."""
