"""Websocket origin checking (contract §6)."""

from channels.security.websocket import OriginValidator
from django.conf import settings


class BrowserOriginValidator(OriginValidator):
    """Channels' ``AllowedHostsOriginValidator``, except that a handshake with
    no ``Origin`` header is let through: browsers always send one, so only
    non-browser clients (which cannot be driven cross-site) omit it, and they
    still authenticate. An ``Origin`` that is not an allowed host is refused."""

    def __init__(self, application):
        super().__init__(application, settings.ALLOWED_HOSTS)

    def valid_origin(self, parsed_origin):
        return parsed_origin is None or self.validate_origin(parsed_origin)
