"""The Twisted client's ``upload_job`` as a program, for case 5 (a Twisted application
uploading a directory): ``FILEDOCK_URL``/``FILEDOCK_TOKEN`` name the server.

    python tx_upload.py JOB DIR
"""

from __future__ import annotations

import os
import sys

from twisted.internet import defer, task

from filedock.client.txclient import TxApiClient, upload_job


async def main(reactor, job: str, directory: str) -> None:
    api = TxApiClient(reactor, os.environ["FILEDOCK_URL"], os.environ.get("FILEDOCK_TOKEN"))
    results = await upload_job(api, job, [directory], create=True)
    bad = [r for r in results if r.state != "complete"]
    if bad:
        raise SystemExit(f"{len(bad)} files not complete, first: {bad[0].name}: {bad[0].state}")


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1], sys.argv[2])))
