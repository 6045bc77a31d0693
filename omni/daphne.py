"""What daphne's command line cannot set, set when the ASGI application loads.

Daphne serves websockets with autobahn, whose protocols fail a connection
"by drop" by default: an oversized frame (over daphne's
``--websocket_max_message_size``, 1 MB) or any other protocol violation
closes the TCP connection with no close frame, so a client cannot tell why.
Contract §5: a frame larger than the server's limit closes the socket with
code 1009. ``failByDrop=False`` makes autobahn send the close frame (1009,
"message too big") and finish the closing handshake instead.

Applied from ``omni/asgi.py``: daphne imports the application before it
builds its websocket factory. ``tests/test_e2e_chat.py`` checks the 1009 on a
live server, so a daphne or autobahn upgrade that changes this fails there.

With ``OMNI_LOG_FORMAT=json`` daphne's access log (``daphne.access``,
written by daphne's ``AccessLogGenerator`` straight to a stream, in NCSA
format) becomes a log record of the ``daphne.access`` logger instead, so it
is a JSON line like every other (``tests/test_logs_e2e.py``).
"""

import logging

access_logger = logging.getLogger("daphne.access")


def configure() -> None:
    _configure_websockets()
    from django.conf import settings

    if settings.OMNI_LOG_FORMAT == "json":
        from omni import logs

        _json_access_log()
        logs.capture_stray_output()


def _json_access_log() -> None:
    try:
        from daphne.access import AccessLogGenerator
    except ImportError:  # not served by daphne
        return
    if getattr(AccessLogGenerator, "_omni_json", False):
        return

    def write_entry(self, host, date, request, status=None, length=None, ident=None, user=None):
        method, _, path = request.partition(" ")
        fields = {"client": host, "method": method, "path": path}
        if status is not None:
            fields["status"] = status
        if length is not None:
            fields["size"] = length
        # the same text as daphne's line, less its date (the record has its time)
        access_logger.info('%s %s %s "%s" %s %s', host, ident or "-", user or "-", request,
                           status or "-", length or "-", extra={"fields": fields})

    AccessLogGenerator.write_entry = write_entry
    AccessLogGenerator._omni_json = True


def _configure_websockets() -> None:
    try:
        from daphne.ws_protocol import WebSocketFactory
    except ImportError:  # not served by daphne
        return
    if getattr(WebSocketFactory, "_omni_configured", False):
        return
    original = WebSocketFactory.setProtocolOptions

    def setProtocolOptions(self, *args, **kwargs):
        kwargs.setdefault("failByDrop", False)
        return original(self, *args, **kwargs)

    WebSocketFactory.setProtocolOptions = setProtocolOptions
    WebSocketFactory._omni_configured = True
