"""Adapters to what the ComputeHorde validator already speaks, each behind its own optional extra.

- ``streams.integrations.channels`` (extra ``[channels]``): machine specs and job statuses over the
  Django Channels layer (channels_redis), as the validator's spec producer and job driver send them.
- ``streams.integrations.prometheus`` (extra ``[prometheus]``): the client's metrics as Prometheus
  collectors, beside statsd.

Nothing here is imported by the core: import the module you need.
"""
