"""The telemetry service: CLI ingest, per-device counters and the per-username projection.

Owns the ``telemetry`` database. Talks to swamp_app only through ``shared_contracts`` queues.
"""
