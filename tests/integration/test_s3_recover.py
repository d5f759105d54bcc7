"""A server that died between CompleteMultipartUpload and deleting the tail: the next server takes
the object back whole, and the tail and block list objects go with the recording (fsck found a
stray ``.part`` next to a complete file after SIGKILLs before this)."""

from __future__ import annotations

import os
import uuid

from filedock.digest import ContentHasher
from filedock.store.s3 import S3BlobStore

MiB = 1 << 20


def test_taking_back_an_unrecorded_complete_object_removes_its_stale_tail(s3_bucket):
    job, key = str(uuid.uuid4()), str(uuid.uuid4())
    data = os.urandom(18 * MiB + 3)
    digest = ContentHasher()
    digest.update(data)
    first = S3BlobStore(s3_bucket.client(), s3_bucket.bucket, "fd-test")
    w = first.open_partial(job, key, 0, 0, None, size=len(data))
    w.write(data)
    cp = w.checkpoint()
    w.finish(digest.hexdigest())
    first.close()
    client = s3_bucket.client()
    name = f"fd-test/jobs/{job}/{key}"
    # what the dead server left: a tail and a block list beside the complete object
    client.put_object(Bucket=s3_bucket.bucket, Key=name + ".part", Body=b"x")
    client.put_object(Bucket=s3_bucket.bucket, Key=name + ".blocks", Body=b"y")

    second = S3BlobStore(s3_bucket.client(), s3_bucket.bucket, "fd-test")
    w2 = second.open_partial(job, key, cp.offset, cp.crc32, cp.stamp, size=len(data))
    assert w2.offset == len(data)
    w2.finish(digest.hexdigest())
    second.close()
    names = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket.bucket).get("Contents", [])]
    assert names == [name]
