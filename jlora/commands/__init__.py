"""One module per `jlora` subcommand, each with `register(subparsers)` that sets `func`."""
