"""The exit codes of every `myshop` command, the worker's (`myshop consume`) included."""

EXIT_OK = 0  # done; for the worker: a planned stop (a limit, a signal, stop-workers)
EXIT_FAIL = 1  # the command failed; for the worker: it crashed
EXIT_CONFIG = 2  # a setting, an option or an argument is wrong: nothing was tried
EXIT_UNAVAILABLE = 3  # a service (RabbitMQ, MongoDB, Redis) could not be reached
