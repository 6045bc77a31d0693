"""The websocket ``Origin`` check (issue 15, item 6): scheme, host and port
must be the page's own origin (the request's ``Host`` and the scheme it came
in on) or a trusted origin (``OMNI_CSRF_TRUSTED_ORIGINS``), as Django's CSRF
origin check does for HTTP. No ``Origin`` (non-browser clients) is let
through; they still authenticate."""

import pytest
from channels.testing import WebsocketCommunicator

from omni.asgi import application

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.engine_agnostic]

HOST = "127.0.0.1:8000"


async def handshake(origin=None, host=HOST, scheme=None, extra=()) -> bool:
    headers = [(b"host", host.encode())] if host else []
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    headers.extend(extra)
    comm = WebsocketCommunicator(application, "/ws/chat/", headers=headers)
    if scheme:
        comm.scope["scheme"] = scheme
    connected, _ = await comm.connect()
    if connected:
        await comm.disconnect()
    return connected


async def test_the_pages_own_origin_is_accepted():
    assert await handshake("http://127.0.0.1:8000")
    assert await handshake("http://localhost:8000", host="localhost:8000")
    assert await handshake("http://localhost", host="localhost")  # default port


async def test_no_origin_is_accepted():
    assert await handshake(None)


@pytest.mark.parametrize("origin", [
    "http://127.0.0.1:1",          # another port of the same host
    "http://127.0.0.1",            # the default port is another port
    "https://127.0.0.1:8000",      # another scheme
    "http://localhost:8000",       # another (allowed) host is another origin
    "http://evil.example",
    "null",
    "",
])
async def test_another_origin_is_refused(origin):
    assert not await handshake(origin)


async def test_a_host_that_is_not_allowed_is_refused_even_as_its_own_origin():
    assert not await handshake("http://evil.example:8000", host="evil.example:8000")
    assert not await handshake("http://127.0.0.1:8000", host=None)  # no Host, no server address


async def test_two_origins_are_refused():
    assert not await handshake("http://127.0.0.1:8000", extra=[(b"origin", b"http://127.0.0.1:8000")])


async def test_a_tls_socket_is_an_https_origin():
    assert await handshake("https://127.0.0.1:8000", scheme="wss")
    assert not await handshake("http://127.0.0.1:8000", scheme="wss")


async def test_behind_a_tls_proxy_x_forwarded_proto_decides(settings):
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    proto = [(b"x-forwarded-proto", b"https")]
    assert await handshake("https://127.0.0.1:8000", extra=proto)
    assert not await handshake("http://127.0.0.1:8000", extra=proto)
    assert await handshake("http://127.0.0.1:8000", extra=[(b"x-forwarded-proto", b"http")])
    # without the setting the header is not believed
    settings.SECURE_PROXY_SSL_HEADER = None
    assert not await handshake("https://127.0.0.1:8000", extra=proto)


async def test_trusted_origins_are_accepted(settings):
    settings.CSRF_TRUSTED_ORIGINS = ["https://omni.example.com", "https://*.corp.example"]
    assert await handshake("https://omni.example.com")
    assert await handshake("https://app.corp.example")
    assert not await handshake("http://omni.example.com")
    assert not await handshake("https://omni.example.com:8443")
    assert not await handshake("https://corp.example.evil")
