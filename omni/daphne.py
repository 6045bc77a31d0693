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
"""


def configure() -> None:
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
