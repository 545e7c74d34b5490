"""The protocol between telemetry_service and swamp_app.

Both services import this package and nothing of each other: the message schemas
(``messages``), the names of the bus database's collections (``names``), the work-queue engine
that moves a message through its states (``queue``), and the settings every process shares.
"""
