"""Where data lives: `s3://bucket/prefix` or a local path, as a pyarrow FileSystem and a path in it.

S3 (or any S3-compatible store) is reached through `pyarrow.fs.S3FileSystem`:

- endpoint: `data.s3_endpoint`, else `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, else AWS itself.
  `http://host:port`, `https://host` and a bare `host:port` (https) are accepted.
- region: `data.s3_region`, else the AWS SDK's own choice (`AWS_REGION`, profile, ...).
- credentials: the standard AWS chain (environment, `~/.aws` profile, instance role). This module
  never reads, prints or logs them; error messages name the URI and the endpoint only.
- timeouts are short (connect 3 s, two attempts) so a dead endpoint fails within seconds.

Every failure to reach or list a location becomes one `UserError` that names the URI and says which
of "missing", "unreachable endpoint", "credentials refused", "no such bucket" it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipelines.errors import UserError

S3_CONNECT_TIMEOUT_S = 3.0
S3_REQUEST_TIMEOUT_S = 30.0
S3_MAX_ATTEMPTS = 2


@dataclass(frozen=True)
class Location:
    """A directory or file: `filesystem` + `path` inside it (`bucket/key` for S3, absolute locally).

    `uri` is what the user wrote; it goes into messages. Picklable, so it travels to Ray workers
    (an S3 filesystem pickles its endpoint and options, not credentials resolved from the chain).
    """

    filesystem: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_s3(self) -> bool:
        return self.filesystem.type_name == "s3"

    def join(self, *parts: str) -> Location:
        """A location below this one (`parts` are `/`-separated names)."""
        path = "/".join([self.path.rstrip("/"), *(p.strip("/") for p in parts)])
        uri = "/".join([self.uri.rstrip("/"), *(p.strip("/") for p in parts)])
        return Location(self.filesystem, path, uri)

    def uri_of(self, path: str) -> str:
        """The user-facing URI of a path on this location's filesystem."""
        return uri_of(self.filesystem, path)


def uri_of(filesystem: pafs.FileSystem, path: str) -> str:
    """`s3://bucket/key` for S3 paths, the plain path for local files."""
    return f"s3://{path}" if filesystem.type_name == "s3" else path


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_endpoint(configured: str | None) -> str | None:
    """The endpoint to use: the configured one, else the standard AWS environment variables."""
    return configured or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_filesystem(endpoint: str | None = None, region: str | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem with short timeouts; credentials come from the standard AWS chain."""
    kwargs: dict[str, object] = {
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "request_timeout": S3_REQUEST_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
    }
    endpoint = s3_endpoint(endpoint)
    if endpoint:
        scheme, sep, host = endpoint.partition("://")
        if not sep:
            scheme, host = "https", endpoint
        if scheme not in ("http", "https") or not host.strip("/"):
            raise UserError(
                f"S3 endpoint {endpoint!r} is not a URL like http://host:port or https://host"
            )
        kwargs["endpoint_override"] = host.rstrip("/")
        kwargs["scheme"] = scheme
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, endpoint: str | None = None, region: str | None = None) -> Location:
    """`s3://bucket/prefix` or a local path -> Location. Does no I/O."""
    if not uri:
        raise UserError("no data URI given: set data.uri (or --data) to s3://bucket/prefix or a directory")
    if is_s3_uri(uri):
        path = uri[len("s3://") :].strip("/")
        if not path:
            raise UserError(f"{uri!r} names no bucket: use s3://bucket/prefix")
        return Location(s3_filesystem(endpoint, region), path, uri.rstrip("/"))
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise UserError(f"{uri!r}: unsupported scheme {scheme!r}; use s3://bucket/prefix or a local path")
    path = os.path.abspath(os.path.expanduser(uri))
    return Location(pafs.LocalFileSystem(), path, uri)


def storage_error(uri: str, exc: BaseException, endpoint: str | None = None) -> UserError:
    """Turn a pyarrow/AWS error into one line that names the URI and the kind of failure."""
    text = str(exc)
    where = f" (endpoint {s3_endpoint(endpoint)})" if is_s3_uri(uri) and s3_endpoint(endpoint) else ""
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


def file_info(loc: Location, endpoint: str | None = None) -> pafs.FileInfo:
    """The FileInfo of `loc`; unreachable endpoints and refused credentials raise UserError."""
    try:
        return loc.filesystem.get_file_info(loc.path)
    except (OSError, ValueError) as e:
        raise storage_error(loc.uri, e, endpoint) from None


def list_files(loc: Location, endpoint: str | None = None) -> list[pafs.FileInfo]:
    """Every file below `loc` (recursive). Metadata only: no file is opened.

    A missing or empty prefix, an unreachable endpoint or refused credentials raise UserError.
    """
    try:
        infos = loc.filesystem.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    except (OSError, ValueError) as e:
        raise storage_error(loc.uri, e, endpoint) from None
    files = [i for i in infos if i.type == pafs.FileType.File]
    if not files:
        raise UserError(f"{loc.uri}: no files there (empty or missing prefix)")
    return files


def list_dirs(loc: Location, endpoint: str | None = None) -> list[str]:
    """Names of the directories directly below `loc` (empty if `loc` does not exist)."""
    try:
        infos = loc.filesystem.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    except (OSError, ValueError) as e:
        raise storage_error(loc.uri, e, endpoint) from None
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def read_bytes(filesystem: pafs.FileSystem, path: str) -> bytes:
    """The whole file, in one GET for S3."""
    with filesystem.open_input_stream(path) as f:
        return f.read()


def write_bytes(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write (replace) a file; parent directories are created on local filesystems."""
    if filesystem.type_name != "s3":
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as f:
        f.write(data)
