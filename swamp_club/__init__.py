"""The launcher: the ``swamp-club`` command line and the embedded database for dev and tests.

This is the composition root, the one package allowed to import both services.
"""
