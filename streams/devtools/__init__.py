"""The developer workbench: a facilitator simulator, the demo, and replay of recorded traffic.

Nothing here is needed to run a validator; it serves tests, demos, benchmarks, notebooks and users
testing their own integrations.
"""
