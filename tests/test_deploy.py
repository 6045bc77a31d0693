"""Production settings (README, "Security"): ``manage.py check --deploy``
passes with them, and fails without them."""

import secrets
import subprocess

import pytest

from tests.e2e import PROJECT_VARS, ROOT, python_bin

pytestmark = pytest.mark.engine_agnostic


def check_deploy(tmp_path, **env):
    import os

    base = {k: v for k, v in os.environ.items() if k not in PROJECT_VARS and not k.startswith("OMNI_")}
    base.update(OMNI_DATA_DIR=str(tmp_path / "data"), DJANGO_SETTINGS_MODULE="omni.settings", **env)
    return subprocess.run(
        [python_bin(), "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT, env=base, capture_output=True, text=True, timeout=120,
    )


PRODUCTION = {
    "OMNI_SECURE": "1",
    "OMNI_ALLOWED_HOSTS": "omni.example.com",
    "OMNI_CSRF_TRUSTED_ORIGINS": "https://omni.example.com",
}


def test_the_documented_production_settings_pass_check_deploy(tmp_path):
    done = check_deploy(tmp_path, OMNI_SECRET_KEY=secrets.token_urlsafe(50), **PRODUCTION)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("change, warning", [
    ({"OMNI_SECURE": "0"}, "security.W012"),
    ({"OMNI_DEBUG": "1"}, "security.W018"),
    ({"OMNI_AUTH": "off"}, "omni.W001"),
    ({"OMNI_SECRET_KEY": "short"}, "security.W009"),
])
def test_check_deploy_fails_without_them(tmp_path, change, warning):
    env = {"OMNI_SECRET_KEY": secrets.token_urlsafe(50), **PRODUCTION, **change}
    done = check_deploy(tmp_path, **env)
    assert done.returncode != 0 and warning in done.stdout + done.stderr
