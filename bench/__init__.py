"""Benchmarks of facilitator-streams: ``python -m bench`` (``make bench``) prints one table.

Five figures, measured side by side in one run on this machine:

1. throughput: 20,000 JobStatusUpdates through the full client, every Response read, against a
   plain ``websockets`` client sending the same frames in the same run (the ratio is the figure);
2. memory: bytes per status update buffered while disconnected (tracemalloc and RSS);
3. recovery: time to get a 10,000-message backlog acknowledged once the facilitator is back up;
4. latency: enqueue-to-wire p50/p99 at 1,000 msgs/s while connected;
5. shutdown: seconds from SIGINT to exit of ``python -m streams run`` with 1,000 messages queued.

The facilitator simulator always runs in its own process (``bench.simserver``), for every side of
every comparison, so that the process under test is the only Python code on its core.
"""
