"""Fallback client for the memory case when ``filedock upload`` does not exist: the
library's blocking ``DataPortClient.upload_file`` (hashes and compares, like the CLI).

    python library_upload.py HOST PORT SESSION FILE_KEY PATH
"""

from __future__ import annotations

import sys

from filedock.client.blocking import DataPortClient


def main() -> None:
    host, port, session, key, path = sys.argv[1:6]
    result = DataPortClient(host, int(port)).upload_file(session, key, path)
    print(result.state, flush=True)
    sys.exit(0 if result.state == "complete" else 1)


if __name__ == "__main__":
    main()
