import os

import pytest


def ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def auth_off(settings):
    """Most tests act as the manual guide does: trusting ``resourceId``.
    Tests of authentication set ``settings.OMNI_AUTH = "required"`` again."""
    settings.OMNI_AUTH = "off"
