"""Checks of our own (``manage.py check``; ``--deploy`` for production-only ones)."""

import stat

from django.conf import settings
from django.core.checks import Tags, Warning, register


@register(Tags.security, deploy=True)
def omni_deploy_checks(app_configs, **kwargs):
    problems = []
    if settings.OMNI_AUTH == "off":
        problems.append(Warning(
            "OMNI_AUTH=off: every caller may act on any resource by naming it.",
            hint="Unset OMNI_AUTH (default: required) and issue tokens with manage.py issue_token.",
            id="omni.W001",
        ))
    return problems


@register(Tags.security)
def omni_secret_key_file(app_configs, **kwargs):
    """The generated ``<OMNI_DATA_DIR>/secret_key`` is for the server's user only."""
    path = getattr(settings, "SECRET_KEY_FILE", None)
    try:
        mode = path.stat().st_mode if path else 0
    except OSError:
        return []
    if stat.S_IMODE(mode) & 0o077:
        return [Warning(
            f"{path} (Django's SECRET_KEY) has mode {stat.S_IMODE(mode):o}: "
            "other users of this machine may read or change it.",
            hint=f"chmod 600 {path}, or set OMNI_SECRET_KEY instead.",
            id="omni.W002",
        )]
    return []
