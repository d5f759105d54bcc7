"""The blob-store interface's tests (tests/integration/test_blobstores.py) on Ceph's RADOS Gateway.

The same test functions, collected here with one backend, ``ceph``, under the ``ceph`` marker:
``make test`` leaves them out (no Ceph start), ``make test-ceph`` runs them on the session's
private cluster (tests/engines/ceph.py).
"""

from __future__ import annotations

import pytest

from tests.engines.ceph import ceph_bucket, ceph_s3_endpoint  # noqa: F401 (fixtures)
from tests.integration import test_blobstores as interface
from tests.integration.test_blobstores import blob_store_factory  # noqa: F401 (fixture)

pytestmark = pytest.mark.ceph

# Every interface test, collected again in this module so that it resolves ``backend`` below.
globals().update({name: test for name, test in vars(interface).items()
                  if name.startswith("test_") and callable(test)})


@pytest.fixture(params=["ceph"])
def backend(request):
    """(name, S3Target): a fresh bucket on the private Ceph gateway."""
    return request.param, request.getfixturevalue("ceph_bucket")
