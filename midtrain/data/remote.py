"""Shards in object storage (``s3://``, ``gs://``): list a prefix, read a small file.

litdata streams and caches the chunk files itself; midtrain only needs to list the shard
directories under a remote ``data_path`` and read each ``index.json`` for token counts. Clients
are built as litdata builds its own from the same ``storage_options``: ``boto3`` for ``s3://``
(``session.client("s3", **storage_options)``, e.g. ``endpoint_url``, ``region_name``, keys) and
``google.cloud.storage.Client(**storage_options)`` for ``gs://``.
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
