"""`make bench`: every scenario, one table, written to bench/RESULTS.md with the machine.

Sizes default to what the embedded server handles in minutes; with MONGODB_URI pointing at a
real MongoDB, raise them (e.g. --backfill-usernames 100000).
"""

from __future__ import annotations

import argparse
import asyncio

from bench import backfill, ingest, pipeline, queue
from bench.common import write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queue-messages", type=int, default=500)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--ingest-events", type=int, default=1000)
    parser.add_argument("--backfill-usernames", type=int, default=1000)
    parser.add_argument("--backfill-batch-sizes", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--pipeline-events", type=int, default=1500)
    parser.add_argument("--pipeline-rate", type=float, default=200.0)
    args = parser.parse_args()
    results = [
        asyncio.run(pipeline.run(args.pipeline_events, args.pipeline_rate, 10, 20)),
        asyncio.run(ingest.run(args.ingest_events, 10, 40, [1, 100, 500])),
        asyncio.run(backfill.run(args.backfill_usernames, args.backfill_batch_sizes)),
        asyncio.run(queue.run(args.queue_messages, args.burst)),
    ]
    for result in results:
        print(result.markdown())
    write_results(results)


if __name__ == "__main__":
    main()
