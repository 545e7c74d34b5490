"""Users: registration, renames (#211), whoami."""
