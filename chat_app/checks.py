"""Checks of the chat app (``manage.py check``; ``make run`` runs them with ``migrate``)."""

from django.core.checks import Error, Tags, register


@register(Tags.compatibility)
def omni_workspace(app_configs, **kwargs):
    """The CLI's working directory can be used (see :func:`chat_app.sdk.workspace_dir`)."""
    from .sdk import NotPrivate, workspace_dir

    try:
        workspace_dir()
    except (NotPrivate, OSError) as exc:
        return [Error(
            f"the CLI's working directory cannot be used: {exc}",
            hint="Set OMNI_WORKSPACE_DIR to a directory of the server's user, the same path on every worker.",
            id="omni.E001",
        )]
    return []
