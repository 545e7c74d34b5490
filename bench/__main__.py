"""`make bench`: every scenario, one table, written to bench/RESULTS.md."""

from __future__ import annotations

import argparse
import asyncio

from bench import queue
from bench.common import write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queue-messages", type=int, default=500)
    parser.add_argument("--burst", type=int, default=1000)
    args = parser.parse_args()
    results = [asyncio.run(queue.run(args.queue_messages, args.burst))]
    for result in results:
        print(result.markdown())
    write_results(results)


if __name__ == "__main__":
    main()
