"""API tokens (contract §6): the one module that makes, checks and revokes
them, used by the HTTP auth classes, the websocket middleware, the
management commands and the admin.

A token is ``omni_`` plus 43 URL-safe characters (256 random bits). The
database keeps its SHA-256 and its first :data:`PREFIX_LEN` characters.
"""

import hashlib
import hmac
import secrets
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from .models import ApiToken

TOKEN_PREFIX = "omni_"
PREFIX_LEN = 12  # "omni_" + 7 characters: shown in the admin, used by revoke_token
# last_used_at is written at most this often per token, not on every request.
LAST_USED_EVERY = timedelta(minutes=1)


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def issue(username: str, expires_in_days: float | None = None) -> tuple[str, ApiToken]:
    """A new token for ``username`` (the user is created, without a usable
    password, if needed): ``(the token, its row)``. The token itself is not
    stored anywhere: this is the only time it is known."""
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires_at = None
    if expires_in_days is not None:
        expires_at = timezone.now() + timedelta(days=expires_in_days)
    with transaction.atomic():
        user, created = get_user_model().objects.get_or_create(username=username)
        if created:
            user.set_unusable_password()
            user.save(update_fields=["password"])
        row = ApiToken.objects.create(
            user=user, prefix=raw[:PREFIX_LEN], token_hash=hash_token(raw), expires_at=expires_at
        )
    return raw, row


def _usable(row: ApiToken | None, raw: str, now) -> bool:
    return (
        row is not None
        and hmac.compare_digest(row.token_hash, hash_token(raw))
        and row.revoked_at is None
        and (row.expires_at is None or row.expires_at > now)
        and row.user.is_active
    )


def _plausible(raw) -> bool:
    return isinstance(raw, str) and raw.startswith(TOKEN_PREFIX) and len(raw) < 200


def authenticate(raw: str):
    """The active user a token belongs to, or None (unknown, expired, revoked,
    or its user inactive)."""
    if not _plausible(raw):
        return None
    now = timezone.now()
    row = ApiToken.objects.select_related("user").filter(token_hash=hash_token(raw)).first()
    if not _usable(row, raw, now):
        return None
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_EVERY:
        ApiToken.objects.filter(pk=row.pk).update(last_used_at=now)
    return row.user


async def aauthenticate(raw: str):
    """:func:`authenticate` with Django's async ORM."""
    if not _plausible(raw):
        return None
    now = timezone.now()
    row = await ApiToken.objects.select_related("user").filter(token_hash=hash_token(raw)).afirst()
    if not _usable(row, raw, now):
        return None
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_EVERY:
        await ApiToken.objects.filter(pk=row.pk).aupdate(last_used_at=now)
    return row.user


def revoke(*, prefix: str | None = None, username: str | None = None) -> int:
    """Revoke the live tokens matching a prefix and/or a username; how many."""
    rows = ApiToken.objects.filter(revoked_at__isnull=True)
    if prefix:
        rows = rows.filter(prefix__startswith=prefix[:PREFIX_LEN])
        if len(prefix) > PREFIX_LEN:  # a whole token was given
            rows = rows.filter(token_hash=hash_token(prefix))
    if username:
        rows = rows.filter(user__username=username)
    return rows.update(revoked_at=timezone.now())
