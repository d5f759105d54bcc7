"""A real server process with its blobs on Ceph's RADOS Gateway (``--blobs s3://...``).

The server-process tests of tests/integration/test_s3_server.py, collected again here with their
``s3_bucket`` fixture bound to a bucket on the private Ceph gateway (tests/engines/ceph.py), under
the ``ceph`` marker (``make test-ceph``): upload, SIGKILL mid-upload, restart, resume from the
bucket (never from 0), download byte-identical, ``fsck`` clean, no multipart upload left; and
``fsck`` finding and aborting an orphan multipart upload.
"""

from __future__ import annotations

import pytest

from tests.engines.ceph import ceph_bucket, ceph_s3_endpoint  # noqa: F401 (fixtures)
from tests.integration import test_s3_server as on_s3

pytestmark = pytest.mark.ceph

test_sigkill_mid_upload_resumes_from_the_bucket_and_downloads_identical = \
    on_s3.test_sigkill_mid_upload_resumes_from_the_bucket_and_downloads_identical
test_fsck_reports_and_repairs_an_orphan_multipart_upload = \
    on_s3.test_fsck_reports_and_repairs_an_orphan_multipart_upload


@pytest.fixture
def s3_bucket(ceph_bucket):  # noqa: F811
    """The bucket those tests use: here, a fresh one on Ceph."""
    return ceph_bucket
