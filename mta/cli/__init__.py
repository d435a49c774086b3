"""The ``mta`` command line, one module per command group."""

from mta.cli.app import main

__all__ = ["main"]
