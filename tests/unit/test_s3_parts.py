"""The S3 part-size rule and the --blobs URL parsing (no engine needed)."""

from __future__ import annotations

import pytest

from filedock.digest import BLOCK_SIZE
from filedock.errors import ErrorCode, FiledockError
from filedock.store.blobstore import open_blob_store
from filedock.store.s3 import MAX_PARTS, MIN_PART, S3_MIN_PART, part_size_for, s3_client_for

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize("size", [0, 1, 5 * MiB, 8 * MiB, 1 * GiB, 78 * GiB, 80 * GiB, 1 * TiB, 4 * TiB, 5 * TiB])
def test_part_size_fits_the_file_in_10000_parts_of_at_least_8_mib(size):
    part = part_size_for(size)
    assert part >= MIN_PART >= S3_MIN_PART
    assert part % BLOCK_SIZE == 0  # block boundaries of full parts are part boundaries
    assert -(-size // part) <= MAX_PARTS
    assert part - BLOCK_SIZE < max(MIN_PART, -(-size // MAX_PARTS))  # the smallest such multiple


def test_a_5_tib_file_gets_parts_above_500_mib():
    assert part_size_for(5 * TiB) > 500 * MiB
    assert part_size_for(5 * TiB) == 528 * MiB


def test_small_files_get_8_mib_parts():
    assert part_size_for(1) == part_size_for(78 * GiB) == 8 * MiB


@pytest.mark.parametrize("url", [
    "s3://",
    "s3://UPPER/x",
    "s3://b/p?endpoint=ftp://x",
    "s3://bucket/p?colour=blue",
    "s3://bucket/../up",
    "gopher://x",
    "file://host/dir",
])
def test_bad_blobs_urls_get_a_clear_error(url, tmp_path):
    with pytest.raises(FiledockError) as err:
        open_blob_store(url, tmp_path)
    assert err.value.code is ErrorCode.BAD_BLOBS_URL
    assert "--blobs" in err.value.message


def test_url_names_bucket_prefix_endpoint_and_region():
    client, bucket, prefix = s3_client_for("s3://my-bucket/a/b?endpoint=http://127.0.0.1:9&region=eu-west-3")
    assert (bucket, prefix) == ("my-bucket", "a/b")
    assert client.meta.endpoint_url == "http://127.0.0.1:9"
    assert client.meta.region_name == "eu-west-3"


def test_an_unknown_profile_is_a_bad_url():
    with pytest.raises(FiledockError) as err:
        s3_client_for("s3://my-bucket/p?profile=no-such-profile-here")
    assert err.value.code is ErrorCode.BAD_BLOBS_URL


def test_blobs_url_comes_from_the_flag_else_filedock_blobs(monkeypatch):
    from filedock.config import blobs_url

    monkeypatch.delenv("FILEDOCK_BLOBS", raising=False)
    assert blobs_url(None) is None
    monkeypatch.setenv("FILEDOCK_BLOBS", "s3://from-env/p")
    assert blobs_url(None) == "s3://from-env/p"
    assert blobs_url("s3://from-flag/p") == "s3://from-flag/p"
