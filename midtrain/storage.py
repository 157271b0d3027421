"""Storage: one interface for local paths and ``s3://`` / ``gs://`` URLs.

Shard discovery, validation sets, ``evaluate`` and ``similarity`` go through :class:`Store` to list a
directory, read a small file (an ``index.json``) and open a shard as a litdata ``StreamingDataset``;
litdata streams and caches remote chunk files itself. Remote clients are built as litdata builds its
own from the same ``storage_options``: ``boto3`` for ``s3://`` (``session.client("s3", **storage_options)``,
e.g. ``endpoint_url``, ``region_name``, keys) and ``google.cloud.storage.Client(**storage_options)`` for ``gs://``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from midtrain.errors import MidtrainError

REMOTE_SCHEMES = ("s3", "gs")


def is_remote(path: str | Path | None) -> bool:
    """True for ``s3://…`` and ``gs://…`` URLs."""
    return isinstance(path, str) and urlparse(path).scheme in REMOTE_SCHEMES and path.split(":", 1)[1][:2] == "//"


def join_url(url: str, *parts: str) -> str:
    """``join_url("s3://b/data", "c1", "index.json")`` -> ``"s3://b/data/c1/index.json"``."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def join(path: str | Path, *parts: str) -> str | Path:
    """``path / part / ...`` for a local path, :func:`join_url` for a URL."""
    return join_url(str(path), *parts) if is_remote(path) else Path(path).joinpath(*parts)


def location(path: str | Path) -> str | Path:
    """The canonical form of ``path``: a URL without its trailing slash, or an expanded local ``Path``."""
    return str(path).rstrip("/") if is_remote(path) else Path(path).expanduser()


class Store:
    """List, read and open under a local path or a remote URL (``storage_options`` for the latter).

    One remote client is built lazily per store and reused for every call.
    """

    def __init__(self, path: str | Path, storage_options: dict[str, Any] | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        self.remote = RemoteStore(str(path), self.storage_options) if is_remote(path) else None

    def list_dirs(self, path: str | Path) -> list[str]:
        """Names of the subdirectories of ``path``, sorted."""
        if self.remote is not None:
            return self.remote.list_dirs(str(path))
        return sorted(c.name for c in Path(path).iterdir() if c.is_dir())

    def read_bytes(self, path: str | Path) -> bytes | None:
        """Contents of the file at ``path``; None when it does not exist."""
        if self.remote is not None:
            return self.remote.read_bytes(str(path))
        return Path(path).read_bytes() if Path(path).is_file() else None

    def open_dataset(self, path: str | Path, block_size: int, **kwargs: Any) -> Any:
        """The shard at ``path`` as an unshuffled litdata ``StreamingDataset`` of ``block_size``-token windows."""
        return open_dataset(path, block_size, self.storage_options, **kwargs)


def open_dataset(path: str | Path, block_size: int, storage_options: dict[str, Any] | None = None, **kwargs: Any):
    """The shard at ``path`` (local or URL) as an unshuffled litdata ``StreamingDataset`` of token windows."""
    from litdata import StreamingDataset, TokensLoader

    return StreamingDataset(
        str(path),
        item_loader=TokensLoader(block_size=block_size),
        shuffle=False,
        storage_options=dict(storage_options or {}),
        **kwargs,
    )


def _split(url: str) -> tuple[str, str, str]:
    parsed = urlparse(url)
    if parsed.scheme not in REMOTE_SCHEMES or not parsed.netloc:
        raise MidtrainError(f"{url!r} is not a remote URL; expected s3://bucket/prefix or gs://bucket/prefix.")
    return parsed.scheme, parsed.netloc, parsed.path.lstrip("/")


class RemoteStore:
    """Listing and reading under one bucket, with the credentials/endpoint in ``storage_options``."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.scheme, self.bucket, _ = _split(url)
        self.storage_options = dict(storage_options or {})
        self._client: Any = None
        endpoint = str(self.storage_options.get("endpoint_url", ""))
        if self.scheme == "s3" and endpoint.startswith("http://"):
            raise MidtrainError(
                f"data.storage_options names a plain-http endpoint {endpoint}: litdata downloads chunks with obstore, "
                "which refuses http, so training could not read the shards; serve it over https (for a private CA: "
                "verify=<ca.pem> in storage_options and SSL_CERT_FILE=<ca.pem> in the environment)."
            )

    def list_dirs(self, url: str) -> list[str]:
        """Names of the immediate "subdirectories" (common prefixes) of ``url``, sorted."""
        prefix = _split(url)[2].rstrip("/")
        prefix = f"{prefix}/" if prefix else ""
        try:
            if self.scheme == "s3":
                pages = self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=prefix, Delimiter="/"
                )
                names = [p["Prefix"] for page in pages for p in page.get("CommonPrefixes", [])]
            else:
                blobs = self.client.list_blobs(self.bucket, prefix=prefix, delimiter="/")
                for _ in blobs.pages:  # prefixes are filled in while the pages are read
                    pass
                names = list(blobs.prefixes)
        except MidtrainError:
            raise
        except Exception as e:
            raise self._error(url, "list", e) from e
        return sorted(name[len(prefix) :].rstrip("/") for name in names)

    def read_bytes(self, url: str) -> bytes | None:
        """Contents of the object at ``url``; None when it does not exist."""
        key = _split(url)[2]
        try:
            if self.scheme == "s3":
                return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            blob = self.client.bucket(self.bucket).blob(key)
            return blob.download_as_bytes() if blob.exists() else None
        except MidtrainError:
            raise
        except Exception as e:
            if _is_missing(e):
                return None
            raise self._error(url, "read", e) from e

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._s3_client() if self.scheme == "s3" else self._gcs_client()
        return self._client

    def _s3_client(self) -> Any:
        import boto3
        import botocore.config

        # Few retries: a wrong endpoint or missing credentials should fail in seconds, not hang.
        config = botocore.config.Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10)
        try:
            return boto3.Session().client("s3", **{"config": config, **self.storage_options})
        except TypeError as e:
            raise MidtrainError(
                f"data.storage_options {sorted(self.storage_options)} are not all boto3 S3 client options "
                f"({e}); use e.g. endpoint_url, region_name, aws_access_key_id, aws_secret_access_key."
            ) from e

    def _gcs_client(self) -> Any:
        try:
            from google.cloud import storage
        except ImportError as e:
            raise MidtrainError(
                "Reading gs:// shards needs the google-cloud-storage package (litdata uses it too): "
                "pip install google-cloud-storage."
            ) from e
        return storage.Client(**self.storage_options)

    def _error(self, url: str, action: str, err: Exception) -> MidtrainError:
        return MidtrainError(
            f"Cannot {action} {url}: {type(err).__name__}: {err}. Check the bucket, the credentials and "
            "data.storage_options (e.g. endpoint_url for an S3-compatible server)."
        )


def _is_missing(err: Exception) -> bool:
    """A 404 / NoSuchKey from boto3, or NotFound from google-cloud-storage."""
    code = str(getattr(err, "response", {}).get("Error", {}).get("Code", "")) if hasattr(err, "response") else ""
    return code in ("NoSuchKey", "404", "NotFound") or type(err).__name__ in ("NoSuchKey", "NotFound")
