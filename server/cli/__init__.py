"""The ``peregrine`` command: one module per subcommand, ``main`` dispatches."""

from server.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
