"""Tuning of one queue consumer; built from settings (``BusSettings.queue_config``)."""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueConfig:
    lease_seconds: float = 30.0
    max_attempts: int = 8
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 300.0
    poll_interval_seconds: float = 1.0
    concurrency: int = 4
    use_change_streams: bool = True
    #: After a change-stream read that brought nothing, the pause before the next (wakeup.py).
    stream_read_interval_seconds: float = 0.0
    done_retention_seconds: int = 7 * 24 * 3600
    #: How often the reaper looks for expired leases; defaults to half a lease.
    reap_interval_seconds: float | None = None

    @property
    def renew_every_seconds(self) -> float:
        # Renew at a quarter of the lease: three renewals can fail before the lease is lost.
        return self.lease_seconds / 4

    @property
    def reap_every_seconds(self) -> float:
        return self.reap_interval_seconds or self.lease_seconds / 2
