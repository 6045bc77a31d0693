"""Deployment checks of our own (``manage.py check --deploy``)."""

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
