"""Server limits and timings: one small frozen object, passed in, never global."""

from __future__ import annotations

import os

from filedock.record import field_names, record

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@record
class Limits:
    """Every limit has a default fit for a real server; all are configurable."""

    max_file_size: int = 4 * TiB
    job_quota: int = 64 * TiB
    max_connections: int = 4096
    max_connections_per_session: int = 16
    max_batches_per_session: int = 4
    max_unauthenticated: int = 1024
    max_unauthenticated_per_address: int = 256
    max_header: int = 4096
    header_timeout: float = 30.0
    idle_timeout: float = 120.0
    disk_reserve: int = 256 * MiB
    checkpoint_bytes: int = 256 * MiB
    checkpoint_seconds: float = 10.0
    partial_ttl: float = 24 * 3600.0
    sweep_interval: float = 600.0
    session_ttl: float = 24 * 3600.0
    max_session_ttl: float = 30 * 24 * 3600.0
    max_api_body: int = 1 * MiB
    max_api_connections: int = 1024
    api_request_timeout: float = 30.0
    max_api_bodies_in_flight: int = 64 * MiB
    batch_max_files: int = 1000
    batch_max_bytes: int = 64 * MiB
    batch_item_max: int = 1 * MiB

    @classmethod
    def names(cls) -> list[str]:
        """Field names, as the CLI's ``--limit NAME=VALUE`` accepts them."""
        return list(field_names(cls))

    def with_overrides(self, pairs: list[str]) -> "Limits":
        """A copy with ``name=value`` overrides (numbers, ``k``/``M``/``G``/``T`` suffixes allowed)."""
        values = {}
        types = {name: Limits.__annotations__[name] for name in field_names(self)}
        for pair in pairs:
            name, sep, raw = pair.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in types:
                raise ValueError(f"unknown limit {name!r}; known: {', '.join(self.names())}")
            values[name] = parse_quantity(raw, float if types[name] in (float, "float") else int)
        return Limits(**{**self.__dict__, **values})


BLOBS_HELP = ("where file bytes go: file:///dir (default: the data dir; file:///dir?direct_io=off keeps large uploads "
              "in the page cache instead of writing them with O_DIRECT) or s3://bucket/prefix?endpoint=URL&region=R"
              "&profile=P (credentials as every S3 tool takes them: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
              "~/.aws/credentials, AWS_PROFILE); else FILEDOCK_BLOBS")


def blobs_url(flag: str | None) -> str | None:
    """The ``--blobs`` URL: the flag, else ``FILEDOCK_BLOBS``, else None (the data dir)."""
    return flag or os.environ.get("FILEDOCK_BLOBS") or None


def parse_quantity(raw: str, kind: type = int) -> int | float:
    """``'64M'`` -> 67108864; ``'1.5'`` -> 1.5 for floats."""
    raw = raw.strip()
    scale = {"k": KiB, "m": MiB, "g": GiB, "t": TiB}.get(raw[-1:].lower(), 1)
    number = raw[:-1] if scale != 1 else raw
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"not a number: {raw!r}") from None
    if value < 0:
        raise ValueError(f"must not be negative: {raw!r}")
    return kind(value)
