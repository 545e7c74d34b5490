"""The main app: users, API keys, renames and the stored UserScore.

Owns the ``swamp_club`` database. Talks to telemetry_service only through the
``shared_contracts`` queues.
"""
