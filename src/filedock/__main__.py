"""``python -m filedock`` runs the command line."""

import sys

from filedock.cli import main

sys.exit(main())
