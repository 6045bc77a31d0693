"""Where attachments are kept: ``STORAGES["attachments"]`` (``omni/settings.py``).

Unset ``OMNI_ATTACHMENT_STORAGE``: Django's ``FileSystemStorage`` under
``<OMNI_DATA_DIR>/attachments/``. ``s3://BUCKET/PREFIX``: :class:`sessions_app.attachments.s3.S3AttachmentStorage`,
django-storages' ``S3Storage`` with what attachments need:

* no ACL on the objects (the bucket's policy decides; many buckets refuse
  ACLs), no presigned URLs (files are served through
  ``GET /api/attachments/<id>`` to their owner only), never overwritten
  (names are unique; ``file_overwrite=False`` checks anyway);
* an upload streamed from its temporary file: one PUT up to
  ``MULTIPART_BYTES``, a multipart upload in parts of that size beyond
  (boto3's transfer manager reads a part at a time);
* a read streamed from the object's body :
  django-storages' ``S3File`` would first download the whole object into
  memory.

Endpoint, region and credentials come from the standard variables boto3
reads (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, ``AWS_REGION`` or
``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN`` or ``AWS_PROFILE``, an instance role...), plus
django-storages' ``AWS_S3_ENDPOINT_URL`` and ``AWS_S3_ADDRESSING_STYLE``
(``path`` for a store without virtual-hosted buckets).
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

MULTIPART_BYTES = 8 * 1024 * 1024


def storage_config(url: str, local_dir) -> dict:
    """``STORAGES["attachments"]`` for ``OMNI_ATTACHMENT_STORAGE`` (``url``);
    ImproperlyConfigured, naming the variable, for anything else than
    empty or ``s3://BUCKET[/PREFIX]``."""
    url = url.strip()
    if not url:
        return {"BACKEND": "django.core.files.storage.FileSystemStorage",
                "OPTIONS": {"location": str(local_dir), "base_url": None,
                            "file_permissions_mode": 0o600, "directory_permissions_mode": 0o700}}
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment or "@" in parts.netloc:
        raise ImproperlyConfigured(
            f"OMNI_ATTACHMENT_STORAGE={url!r}: use s3://BUCKET or s3://BUCKET/PREFIX (an S3-compatible "
            "object store; endpoint and credentials from the AWS_* variables), or leave it unset to keep "
            "attachments under <OMNI_DATA_DIR>/attachments/")
    style = os.environ.get("AWS_S3_ADDRESSING_STYLE") or None
    if style not in (None, "auto", "path", "virtual"):
        raise ImproperlyConfigured(f"AWS_S3_ADDRESSING_STYLE={style!r}: use path, virtual or auto")
    endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_S3_ENDPOINT_URL")
                or os.environ.get("AWS_ENDPOINT_URL") or None)
    region = (os.environ.get("AWS_S3_REGION_NAME") or os.environ.get("AWS_REGION")
              or os.environ.get("AWS_DEFAULT_REGION") or None)
    return {"BACKEND": "sessions_app.attachments.s3.S3AttachmentStorage",
            "OPTIONS": {"bucket_name": parts.netloc, "location": parts.path.strip("/"),
                        "endpoint_url": endpoint, "region_name": region, "addressing_style": style}}


def describe(config: dict) -> str:
    """Where the files are, for people (backup, checks, logs): no credentials."""
    options = config.get("OPTIONS", {})
    if "bucket_name" in options:
        prefix = f"/{options['location']}" if options.get("location") else ""
        at = f" at {options['endpoint_url']}" if options.get("endpoint_url") else ""
        return f"S3 bucket s3://{options['bucket_name']}{prefix}{at}"
    return f"directory {options.get('location')}"
