"""One module per `moe-env` subcommand: each defines add_arguments(parser) and run(args) -> int."""
