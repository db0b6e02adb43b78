"""What operators run besides the worker: transports, the failed and unrouted queues, stats, preflight, verify, the
load generator, the catalog, recommendations, erasure. Imports anything below; never the CLI."""
