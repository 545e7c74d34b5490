"""user_metrics: one document per device, its buckets, and the only code that writes it."""
