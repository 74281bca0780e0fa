"""``python -m brainsurgery`` runs the command line."""

from brainsurgery.cli import main

main()
