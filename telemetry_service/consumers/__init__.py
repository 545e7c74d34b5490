"""Consumers of the app's commands on telemetry_commands."""
