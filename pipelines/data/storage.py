"""Where data lives: `s3://bucket/prefix` or a local path, resolved once into a `Location`.

`resolve(uri, s3)` turns a URI into a `Location` = a `Store` (local disk, or one S3 endpoint with
its `S3Settings`) + the path inside it + the URI as the user wrote it (for messages). Listing and
reading take that object; nothing below re-resolves an endpoint from strings.

S3 (or any S3-compatible store) is reached through `pyarrow.fs.S3FileSystem`:

- endpoint: `data.s3_endpoint`, else `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, else AWS itself,
  read once by `s3_settings`. `http://host:port`, `https://host` and a bare `host:port` (https).
- region: `data.s3_region`, else the AWS SDK's own choice (`AWS_REGION`, profile, ...).
- credentials: the standard AWS chain (environment, `~/.aws` profile, instance role). This module
  never reads, prints or logs them; error messages name the URI and the endpoint only.
- retries: the AWS SDK's standard strategy (`AwsStandardS3RetryStrategy`: jittered exponential
  backoff, up to 20 s between attempts). Image reads make `data.s3_max_attempts` attempts
  (default 10: waits of up to 2, 4, 8, 16, then 20 s, about 100 s in all on average); listing and
  manifest reads make at most `LIST_MAX_ATTEMPTS`, so a wrong endpoint fails in seconds, before any
  compute starts.
  Timeouts: `data.s3_connect_timeout_s`, `data.s3_request_timeout_s`.

A `Store` pickles as its settings and builds its filesystem in each process (cached): pyarrow's
S3FileSystem pickles its endpoint and timeouts but drops its retry strategy, so a filesystem
shipped to a Ray task would silently fall back to the SDK's 3 attempts.

Every failure to reach or list a location becomes one `UserError` that names the URI and says which
of "missing", "unreachable endpoint", "credentials refused", "no such bucket" it is.
"""

from __future__ import annotations

import functools
import os
import posixpath
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from pipelines.errors import UserError

if TYPE_CHECKING:  # xtra_core imports torch; decode workers should not
    from xtra_core.config import DataConfig

LIST_MAX_ATTEMPTS = 3  # listing and manifests: a dead endpoint fails in seconds


@dataclass(frozen=True)
class S3Settings:
    """One S3 endpoint and how to talk to it (picklable, hashable; no credentials)."""

    endpoint: str | None = None  # http(s)://host[:port], resolved once; None = AWS
    region: str | None = None
    connect_timeout_s: float = 3.0
    request_timeout_s: float = 30.0
    max_attempts: int = 10

    def filesystem(self) -> pafs.S3FileSystem:
        """The S3 filesystem for these settings (one per process)."""
        return _s3_filesystem(self)


def s3_settings(data: DataConfig) -> S3Settings:
    """The S3 settings of a data config; the endpoint is resolved here, once."""
    endpoint = data.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL"
    )
    return S3Settings(
        endpoint=endpoint or None,
        region=data.s3_region,
        connect_timeout_s=float(data.s3_connect_timeout_s),
        request_timeout_s=float(data.s3_request_timeout_s),
        max_attempts=int(data.s3_max_attempts),
    )


@functools.lru_cache(maxsize=16)
def _s3_filesystem(s3: S3Settings) -> pafs.S3FileSystem:
    kwargs: dict[str, object] = {
        "connect_timeout": s3.connect_timeout_s,
        "request_timeout": s3.request_timeout_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=s3.max_attempts),
    }
    if s3.endpoint:
        scheme, sep, host = s3.endpoint.partition("://")
        if not sep:
            scheme, host = "https", s3.endpoint
        if scheme not in ("http", "https") or not host.strip("/"):
            raise UserError(
                f"S3 endpoint {s3.endpoint!r} is not a URL like http://host:port or https://host"
            )
        kwargs["endpoint_override"] = host.rstrip("/")
        kwargs["scheme"] = scheme
    if s3.region:
        kwargs["region"] = s3.region
    return pafs.S3FileSystem(**kwargs)


_LOCAL = pafs.LocalFileSystem()


@dataclass(frozen=True)
class Store:
    """A filesystem: the local disk (`s3=None`) or one S3 endpoint. Pickles as its settings."""

    s3: S3Settings | None = None

    @property
    def is_s3(self) -> bool:
        return self.s3 is not None

    @property
    def filesystem(self) -> pafs.FileSystem:
        """For reading images: `s3.max_attempts` attempts per request."""
        return self.s3.filesystem() if self.s3 is not None else _LOCAL

    @property
    def listing_filesystem(self) -> pafs.FileSystem:
        """For listing and manifests: at most LIST_MAX_ATTEMPTS attempts."""
        if self.s3 is None:
            return _LOCAL
        return replace(self.s3, max_attempts=min(self.s3.max_attempts, LIST_MAX_ATTEMPTS)).filesystem()

    def uri_of(self, path: str) -> str:
        """`s3://bucket/key` for S3 paths, the plain path for local files."""
        return f"s3://{path}" if self.s3 is not None else path

    def where(self) -> str:
        """` (endpoint http://...)` for an S3 store with a custom endpoint, for messages."""
        return f" (endpoint {self.s3.endpoint})" if self.s3 is not None and self.s3.endpoint else ""


@dataclass(frozen=True)
class Location:
    """A directory or file: `store` + `path` inside it (`bucket/key` for S3, absolute locally).

    `uri` is what the user wrote; it goes into messages."""

    store: Store
    path: str
    uri: str

    @property
    def is_s3(self) -> bool:
        return self.store.is_s3

    @property
    def filesystem(self) -> pafs.FileSystem:
        return self.store.filesystem

    def join(self, *parts: str) -> Location:
        """A location below this one (`parts` are `/`-separated names). A `..` component is refused:
        names that come from data (labels, file names) never climb out of this location."""
        names = [n for p in parts for n in p.split("/") if n not in ("", ".")]
        if ".." in names:
            raise UserError(f"{self.uri}: refusing the path {'/'.join(parts)!r}: it climbs out with '..'")
        path = "/".join([self.path.rstrip("/"), *names])
        uri = "/".join([self.uri.rstrip("/"), *names])
        return Location(self.store, path, uri)


def uri_of(filesystem: pafs.FileSystem, path: str) -> str:
    """`s3://bucket/key` for S3 paths, the plain path for local files."""
    return f"s3://{path}" if filesystem.type_name == "s3" else path


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


def resolve(uri: str, s3: S3Settings | None = None) -> Location:
    """`s3://bucket/prefix` or a local path -> Location. Does no I/O. `s3`: how to reach S3
    (default: AWS, with the standard environment variables read now)."""
    if not uri:
        raise UserError("no data URI given: set data.uri (or --data) to s3://bucket/prefix or a directory")
    if is_s3_uri(uri):
        path = uri[len("s3://") :].strip("/")
        if not path:
            raise UserError(f"{uri!r} names no bucket: use s3://bucket/prefix")
        if s3 is None:
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            s3 = S3Settings(endpoint=endpoint or None)
        store = Store(s3)
        store.filesystem  # noqa: B018 (a malformed endpoint fails here, naming it)
        return Location(store, path, uri.rstrip("/"))
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise UserError(f"{uri!r}: unsupported scheme {scheme!r}; use s3://bucket/prefix or a local path")
    path = os.path.abspath(os.path.expanduser(uri))
    return Location(Store(), path, uri)


def storage_error(loc: Location, exc: BaseException) -> UserError:
    """Turn a pyarrow/AWS error into one line that names the URI and the kind of failure."""
    text = str(exc)
    uri, where = loc.uri, loc.store.where()
    if isinstance(exc, FileNotFoundError) or "NO_SUCH_KEY" in text:
        return UserError(f"{uri}: does not exist{where}")
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return UserError(f"{uri}: the bucket does not exist{where}")
    if "NETWORK_CONNECTION" in text or "curlCode" in text or "Could not connect" in text:
        return UserError(f"{uri}: cannot reach the S3 endpoint{where or ' (AWS)'}")
    refused = (
        "ACCESS_DENIED",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "INVALID_ACCESS_KEY_ID",
        "SIGNATURE_DOES_NOT_MATCH",
        "ExpiredToken",
        "UNRECOGNIZED_CLIENT",
        "403",
    )
    if any(r in text for r in refused):
        return UserError(f"{uri}: access refused — check the AWS credentials for this bucket{where}")
    if isinstance(exc, PermissionError):
        return UserError(f"{uri}: permission denied")
    first_line = text.splitlines()[0] if text else type(exc).__name__
    return UserError(f"{uri}: cannot read{where}: {first_line}")


def file_info(loc: Location) -> pafs.FileInfo:
    """The FileInfo of `loc`; unreachable endpoints and refused credentials raise UserError."""
    try:
        return loc.store.listing_filesystem.get_file_info(loc.path)
    except (OSError, ValueError) as e:
        raise storage_error(loc, e) from None


def list_files(loc: Location) -> list[pafs.FileInfo]:
    """Every file below `loc` (recursive), with sizes. Metadata only: no file is opened.

    A missing or empty prefix, an unreachable endpoint or refused credentials raise UserError.
    """
    try:
        infos = loc.store.listing_filesystem.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    except (OSError, ValueError) as e:
        raise storage_error(loc, e) from None
    files = [i for i in infos if i.type == pafs.FileType.File]
    if not files:
        raise UserError(f"{loc.uri}: no files there (empty or missing prefix)")
    return files


def list_dirs(loc: Location) -> list[str]:
    """Names of the directories directly below `loc` (empty if `loc` does not exist)."""
    try:
        infos = loc.store.listing_filesystem.get_file_info(
            pafs.FileSelector(loc.path, allow_not_found=True)
        )
    except (OSError, ValueError) as e:
        raise storage_error(loc, e) from None
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def read_manifest_bytes(loc: Location) -> bytes:
    """A small metadata file (a manifest), with the listing's short retry budget."""
    try:
        with loc.store.listing_filesystem.open_input_stream(loc.path) as f:
            return f.read()
    except (OSError, ValueError) as e:
        raise storage_error(loc, e) from None


def read_bytes(filesystem: pafs.FileSystem, path: str, max_bytes: int | None = None) -> bytes:
    """The whole file, in one GET for S3. With `max_bytes`, at most `max_bytes + 1` bytes are read
    (a caller sees that the file is over the limit without downloading all of it)."""
    with filesystem.open_input_stream(path) as f:
        return f.read() if max_bytes is None else f.read(max_bytes + 1)


def write_bytes(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write (replace) a file; parent directories are created on local filesystems."""
    if filesystem.type_name != "s3":
        filesystem.create_dir(posixpath.dirname(path), recursive=True)
    with filesystem.open_output_stream(path) as f:
        f.write(data)
