"""``OMNI_ATTACHMENT_STORAGE=s3://BUCKET/PREFIX`` against a real S3 API on
this machine (moto's server, started here: no cloud, no network): upload
(a multipart upload past 8 MiB, no ACL, the type on the object), download
(streamed), thread delete and the orphans' prune all go through the bucket,
and two live servers share its files (one uploads, the other serves and
sweeps). Nothing here depends on the database engine."""

from __future__ import annotations

import hashlib
import sqlite3
import time
import urllib.request
import uuid
from datetime import timedelta

import boto3
import pytest
from asgiref.sync import async_to_sync
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from sessions_app import services
from sessions_app.attachments import services as attachments
from sessions_app.attachments import sweeper
from sessions_app.attachments.storage import storage_config
from sessions_app.models import Attachment
from tests.e2e import Server

pytestmark = pytest.mark.engine_agnostic

BUCKET = "omni-attachments"
REGION = "eu-west-1"


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                          aws_access_key_id="test", aws_secret_access_key="test")
    client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    yield endpoint
    # moto keeps its buckets in this process's memory, not in the server:
    # empty them (pytest-django may run this module's tests in two groups)
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10)
    server.stop()


def aws_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}


@pytest.fixture
def s3(s3_endpoint, settings, monkeypatch):
    """This process keeps attachments in the bucket, under a prefix of this test's own."""
    for name, value in aws_env(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    settings.STORAGES = {**settings.STORAGES,
                         "attachments": storage_config(f"s3://{BUCKET}/{prefix}", "/nonexistent")}
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION)
    return client, prefix


def keys(client, prefix: str) -> list[str]:
    found = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/").get("Contents", [])
    return sorted(o["Key"] for o in found)


def stored_acl(key: str):
    """The ACL the object was stored with (moto's server runs in this process)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    return s3_backends[DEFAULT_ACCOUNT_ID]["global"].buckets[BUCKET].keys[key].acl


def upload(client, data: bytes, name: str, resource: str = "alice") -> dict:
    from django.core.files.uploadedfile import SimpleUploadedFile

    response = client.post(f"/api/attachments?resourceId={resource}",
                           {"file": SimpleUploadedFile(name, data, content_type="application/octet-stream")})
    assert response.status_code == 201, response.content
    return response.json()


def content(response) -> bytes:
    async def collect():
        return b"".join([chunk async for chunk in response.streaming_content])

    return async_to_sync(collect)()


def download(client, attachment_id: str, resource: str = "alice"):
    return client.get(f"/api/attachments/{attachment_id}?resourceId={resource}")


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("config_dir")
def test_upload_download_delete_and_prune_through_s3(s3, client):
    s3_client, prefix = s3
    big = ("0123456789abcdef" * 65536 * 9).encode()  # 9 MiB of UTF-8 text: past one part
    shared, own = upload(client, big, "big.txt"), upload(client, b"# only A's\n", "a.md")
    assert shared["size"] == len(big) and shared["sha256"] == hashlib.sha256(big).hexdigest()
    rows = {a.attachment_id: a for a in Attachment.objects.all()}
    key = f"{prefix}/{rows[shared['attachmentId']].storage_name}"
    assert keys(s3_client, prefix) == sorted([key, f"{prefix}/{rows[own['attachmentId']].storage_name}"])
    head = s3_client.head_object(Bucket=BUCKET, Key=key)
    assert head["ETag"].strip('"').endswith("-2")  # a multipart upload, in two parts
    assert head["ContentType"] == "text/plain" and head["ContentLength"] == len(big)
    assert stored_acl(key) is None  # no ACL sent (the bucket's policy decides; many refuse ACLs)

    with attachments.storage().open(rows[shared["attachmentId"]].storage_name) as f:
        # read from the object's body as it comes, not downloaded whole first
        assert type(f.file).__name__ == "StreamingBody" and f.size == len(big)
        assert f.read(16) == big[:16]
    response = download(client, shared["attachmentId"])
    assert response.status_code == 200 and response.streaming
    assert content(response) == big
    assert response["Content-Length"] == str(len(big))
    assert download(client, shared["attachmentId"], resource="bob").status_code == 404

    # A thread and its fork carry the big one; only A carries the other.
    for thread_id in ("t-a", "t-b"):
        async_to_sync(services.save_session)(thread_id, "alice", str(uuid.uuid4()), user_message="hi")
    attachments.record_use_sync("alice", "t-a", [rows[shared["attachmentId"]].pk])
    attachments.copy_uses_sync("alice", "t-a", "t-b")
    attachments.record_use_sync("alice", "t-a", [rows[own["attachmentId"]].pk])
    async_to_sync(services.delete_session)("t-a", "alice")
    assert keys(s3_client, prefix) == [key]
    assert download(client, own["attachmentId"]).status_code == 404
    assert download(client, shared["attachmentId"]).status_code == 200
    async_to_sync(services.delete_session)("t-b", "alice")
    assert keys(s3_client, prefix) == []
    assert not Attachment.objects.exists()

    # An upload never sent: pruned after OMNI_ATTACHMENT_ORPHAN_HOURS.
    orphan = upload(client, b"never sent\n", "orphan.txt")
    assert len(keys(s3_client, prefix)) == 1
    assert attachments.prune_orphans_sync() == 0
    Attachment.objects.update(created_at=timezone.now() - timedelta(hours=25))
    assert attachments.prune_orphans_sync() == 1
    assert keys(s3_client, prefix) == []
    assert download(client, orphan["attachmentId"]).status_code == 404


@pytest.mark.django_db(transaction=True)
def test_an_unreachable_bucket(s3, client, settings, caplog):
    """The server's start says so in its log; an upload is a 503, not a 500."""
    settings.STORAGES = {**settings.STORAGES,
                         "attachments": storage_config("s3://no-such-bucket/x", "/nonexistent")}
    problem = sweeper.check_storage_sync()
    assert problem is not None and "s3://no-such-bucket/x" in problem and "cannot be reached" in problem
    from django.core.files.uploadedfile import SimpleUploadedFile

    response = client.post("/api/attachments?resourceId=alice",
                           {"file": SimpleUploadedFile("a.txt", b"hello\n")})
    assert response.status_code == 503, response.content
    assert response.json()["error"] == {
        "code": "unavailable", "message": "the attachment storage cannot take the file now; try again later"}
    assert not Attachment.objects.exists()


def test_the_storage_setting_is_checked():
    for bad in ("http://bucket/x", "s3://", "s3:///prefix", "bucket/prefix", "s3://key:secret@bucket"):
        with pytest.raises(ImproperlyConfigured, match="OMNI_ATTACHMENT_STORAGE=.*use s3://BUCKET"):
            storage_config(bad, "/data/attachments")
    assert storage_config(" ", "/d")["OPTIONS"]["location"] == "/d"
    import os
    import subprocess

    from tests.e2e import ROOT, python_bin

    env = {**os.environ, "OMNI_ATTACHMENT_STORAGE": "https://bucket.example/x"}
    started = subprocess.run([python_bin(), "manage.py", "check"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert started.returncode != 0
    assert started.stderr.strip().splitlines()[-1] == (
        "django.core.exceptions.ImproperlyConfigured: OMNI_ATTACHMENT_STORAGE='https://bucket.example/x': "
        "use s3://BUCKET or s3://BUCKET/PREFIX (an S3-compatible object store; endpoint and credentials "
        "from the AWS_* variables), or leave it unset to keep attachments under <OMNI_DATA_DIR>/attachments/")
    options = storage_config("s3://b/some/prefix/", "/d")["OPTIONS"]
    assert (options["bucket_name"], options["location"]) == ("b", "some/prefix")


# --- two live servers -----------------------------------------------------------------------

def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.e2e
def test_two_servers_share_the_bucket(s3_endpoint, tmp_path):
    """Server A takes an upload, server B serves it; B's own sweep (a
    worker's periodic work, ``chat_app.lifecycle``) deletes it once it is
    an orphan, and neither serves it any more."""
    database = tmp_path / "shared.db"
    env = {**aws_env(s3_endpoint), "OMNI_ATTACHMENT_STORAGE": f"s3://{BUCKET}/live",
           "OMNI_ATTACHMENT_ORPHAN_HOURS": "1", "OMNI_ATTACHMENT_SWEEP_SECONDS": "0.5"}
    a = Server(tmp_path / "a", f"file:{database}", {**env, "OMNI_ATTACHMENT_SWEEP_SECONDS": "0"})
    b = Server(tmp_path / "b", f"file:{database}", env)
    s3_client = boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION,
                             aws_access_key_id="test", aws_secret_access_key="test")
    try:
        a.start()
        b.start()
        data = "ünïcode text\n".encode() * 1000
        body, content_type = multipart("notes.txt", data)
        status, _, out = a.request("POST", "/api/attachments?resourceId=alice", raw=body,
                                   headers={"Content-Type": content_type})
        assert status == 201, out
        path = f"/api/attachments/{out['attachmentId']}?resourceId=alice"
        status, headers, text = b.request("GET", path)
        assert status == 200 and text.encode() == data
        assert headers["content-type"] == "text/plain; charset=utf-8"
        assert len(keys(s3_client, "live")) == 1

        with sqlite3.connect(database, timeout=20) as db:  # two hours old now
            db.execute("UPDATE sessions_app_attachment SET created_at = datetime('now', '-2 hours')")
        deadline = time.monotonic() + 60
        while keys(s3_client, "live") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert keys(s3_client, "live") == []
        assert a.request("GET", path)[0] == 404
        assert b.request("GET", path)[0] == 404
        assert "Deleted 1 upload(s) never sent in a message" in b.log()
    finally:
        try:
            a.stop()
        finally:
            b.stop()
