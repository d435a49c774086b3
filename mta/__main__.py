"""``python -m mta`` runs the CLI."""

from mta.cli import main

main()
