"""`make bench`: every scenario, written to bench/RESULTS.md with the run's environment.

By default (about 15 minutes on the embedded server, 2 cores):
- on disk (what `make run` uses): capacity unpaced, then latency at 50% and 80% of it, the
  10,000-event burst for one user, the watcher alone, backfill at 1k and 10k users, the app's
  claims beside a refresh held by one busy user's back-to-back batches, 1, 2 and 4 telemetry
  processes on one server;
- in memory: capacity unpaced and the watcher alone.
`--backfill-50k` adds the 50k-user backfill; `--queue` the queue micro-benchmark; `--quick`
shrinks every size for a smoke run. With MONGODB_URI set, both "storages" are that deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from bench import backfill, held, ingest, pipeline, queue, replicas
from bench.common import Results, database_uri, environment, server_version, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=10_000, help="capacity run's events")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--devices-per-user", type=int, default=10)
    parser.add_argument("--latency-seconds", type=float, default=20)
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--watcher-events", type=int, default=3000)
    parser.add_argument("--backfill-usernames", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--replica-events", type=int, default=6000)
    parser.add_argument("--backfill-50k", action="store_true")
    parser.add_argument("--backfill-cap-seconds", type=float, default=40)
    parser.add_argument("--held-rounds", type=int, default=20)
    parser.add_argument("--queue", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.events, args.burst, args.watcher_events, args.latency_seconds = 600, 600, 500, 3
        args.replica_events, args.held_rounds = 400, 3
        args.users, args.devices_per_user, args.backfill_usernames = 4, 3, [500, 2000]
        args.backfill_cap_seconds = 10
    sizes = args.backfill_usernames + ([50_000] if args.backfill_50k else [])
    shape = {"users": args.users, "devices_per_user": args.devices_per_user}
    with database_uri("memory") as uri:
        server = asyncio.run(server_version(uri))
    results: list[Results] = []

    def scenario(result: Results) -> None:
        result.finish()
        print(result.markdown(), flush=True)
        results.append(result)

    for storage, full in (("disk", True), ("memory", False)):
        scenario(
            asyncio.run(
                pipeline.run(
                    storage, events=args.events, loads=[0.5, 0.8] if full else [],
                    latency_seconds=args.latency_seconds, burst=args.burst if full else 0,
                    **shape,
                )
            )
        )  # fmt: skip
        # The largest batch the watcher may take: 500, and the default INGEST_MAX_BATCH_SIZE.
        watcher = ingest.run(storage, args.watcher_events, **shape, batch_sizes=[500, 5000])
        scenario(asyncio.run(watcher))
        if full:
            scenario(asyncio.run(backfill.run(storage, sizes, [500], args.backfill_cap_seconds)))
            scenario(asyncio.run(held.run(rounds=args.held_rounds, others=99, batch_seconds=0.2)))
            scenario(
                asyncio.run(
                    replicas.run(storage, [1, 2, 4], users=args.users,
                                 devices_per_user=args.devices_per_user,
                                 events=args.replica_events)
                )
            )  # fmt: skip
    if args.queue:
        scenario(asyncio.run(queue.run(500, 1000)))
    header = environment(server, ["disk", "memory"], sys.argv[1:])
    if os.environ.get("MONGODB_URI"):
        header += "\n\nMONGODB_URI is set: both storage modes ran on that deployment."
    write_results(results, header)


if __name__ == "__main__":
    main()
