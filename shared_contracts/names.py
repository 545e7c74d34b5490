"""Names of the shared bus collections. Database names are settings, collection names are fixed."""

from typing import Final

#: telemetry_service -> swamp_app (score refreshes).
SWAMP_CLUB_EVENTS: Final = "swamp_club_events"
#: swamp_app -> telemetry_service (renames, registrations, API keys).
TELEMETRY_COMMANDS: Final = "telemetry_commands"

QUEUE_COLLECTIONS: Final = (SWAMP_CLUB_EVENTS, TELEMETRY_COMMANDS)
