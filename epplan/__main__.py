"""``python -m epplan`` runs the CLI."""

from epplan.cli import main

main()
