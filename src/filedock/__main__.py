"""``python -m filedock`` runs the command line."""

import gc

# Start-up builds thousands of objects (classes, dataclass methods, regexes) and frees few: the cyclic
# collector's passes over them are wasted work, about 8 ms of a 100 ms start here. ``filedock.cli.entry``
# turns it back on before a command runs (``filedock upload``: once its imports are done).
gc.disable()

from filedock.cli import entry  # noqa: E402

entry()
