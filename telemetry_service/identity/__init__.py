"""Who is who: users by userId, their current names, their devices, their keys.

The only writer of ``identity_map``, ``known_users`` and ``known_keys``. A user's identity is
its userId; a username is a unique, mutable attribute that follows the app's name clock (I6).
"""
