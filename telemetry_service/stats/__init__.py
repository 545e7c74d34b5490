"""GET /v1/stats: a username's projection or a device's buckets."""
