"""What `myshop consume` runs: the micro-batch pipeline, settlement, retry routing, the batching window, limits and
the consume loop, typed on `ports`. Imports `base` and `adapters`, never the tools or the CLI."""
