"""``python -m filedock`` runs the command line."""

from filedock.cli import entry

entry()
