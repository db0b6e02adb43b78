"""One module per outside system (settings, logs, MongoDB, Redis, RabbitMQ and its management API, the embeddings
provider, metrics, systemd): the only code that talks to it. Imports only `base`."""
