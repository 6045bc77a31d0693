"""``OMNI_ATTACHMENT_STORAGE=s3://BUCKET/PREFIX``: the storage class (see
:mod:`sessions_app.attachments.storage` for the settings it takes)."""

from __future__ import annotations

from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError
from django.core.files import File
from storages.backends.s3 import S3Storage
from storages.utils import clean_name

from .storage import MULTIPART_BYTES


class _Body(File):
    """A stored object being read: its body streamed from S3."""

    def __init__(self, body, name: str, size: int):
        super().__init__(body, name)
        self._size = size

    @property
    def size(self):
        return self._size

    def read(self, size=-1):
        return self.file.read(None if size is None or size < 0 else size)

    def close(self):
        self.file.close()


class S3AttachmentStorage(S3Storage):
    def __init__(self, **options):
        options.setdefault("default_acl", None)
        options.setdefault("querystring_auth", False)
        options.setdefault("file_overwrite", False)
        options.setdefault("gzip", False)
        if "client_config" not in options:
            # Bounded: an unreachable store fails a request in seconds (503), not minutes.
            options["client_config"] = Config(
                s3={"addressing_style": options.get("addressing_style")},
                connect_timeout=5, read_timeout=60, retries={"mode": "standard", "max_attempts": 3})
        options.setdefault("transfer_config", TransferConfig(
            multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES, max_concurrency=4))
        super().__init__(**options)

    def _open(self, name, mode="rb"):
        if mode != "rb":
            return super()._open(name, mode)
        key = self._normalize_name(clean_name(name))
        try:
            got = self.connection.meta.client.get_object(Bucket=self.bucket_name, Key=key)
        except ClientError as err:
            if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                raise FileNotFoundError(f"File does not exist: {key}") from None
            raise
        return _Body(got["Body"], name, got.get("ContentLength"))

    def head_bucket(self) -> None:
        """Raises if the bucket cannot be reached with these credentials."""
        self.connection.meta.client.head_bucket(Bucket=self.bucket_name)

    def delete_many(self, names: list[str]) -> int:
        """Delete objects, up to 1000 a request (a missing one is fine);
        returns how many went. Failures are logged, not raised: a file
        without a row is harmless (a row never names a missing file)."""
        import logging

        log = logging.getLogger("omni.attachments")
        gone = 0
        client = self.connection.meta.client
        for start in range(0, len(names), 1000):
            keys = [self._normalize_name(clean_name(n)) for n in names[start:start + 1000]]
            try:
                reply = client.delete_objects(Bucket=self.bucket_name, Delete={
                    "Objects": [{"Key": k} for k in keys], "Quiet": True})
            except Exception:
                log.warning("could not delete %d attachment object(s)", len(keys), exc_info=True)
                continue
            errors = reply.get("Errors", [])
            for error in errors:
                log.warning("could not delete attachment object %s: %s", error.get("Key"), error.get("Message"))
            gone += len(keys) - len(errors)
        return gone
