"""The MongoDB work-queue engine both services use (SPEC section 3)."""
