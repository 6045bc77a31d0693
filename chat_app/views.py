"""The chat page (contract §8): ``GET /``. The page itself is static
(``templates/chat.html``, ``static/chat/``); this view only hands it the
server's configuration."""

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.middleware.csrf import get_token
from django.shortcuts import render, resolve_url
from django.views.decorators.http import require_safe

from sessions_app.resources import auth_required

DEFAULT_RESOURCE_ID = "default-user"


def page_config(request) -> dict:
    """What the page's scripts need, passed with ``json_script``."""
    required = auth_required()
    return {
        "auth": "required" if required else "off",
        "user": request.user.get_username() if required else None,
        "defaultResourceId": DEFAULT_RESOURCE_ID,
        "agents": [
            {"name": name, "description": preset.get("description", "")}
            for name, preset in settings.OMNI_AGENTS.items()
        ],
        "defaultAgent": settings.OMNI_DEFAULT_AGENT,
        "maxMessageChars": settings.OMNI_MAX_MESSAGE_CHARS,
        "attachmentsPerMessage": settings.OMNI_ATTACHMENTS_PER_MESSAGE,
        "attachmentMaxMb": settings.OMNI_ATTACHMENT_MAX_MB,
        "apiBase": "/api",
        "wsPath": "/ws/chat/",
        "loginUrl": resolve_url(settings.LOGIN_URL),
        # REST calls of a logged-in page send it as X-CSRFToken.
        "csrfToken": get_token(request),
    }


@require_safe
def chat_page(request):
    if auth_required() and not request.user.is_authenticated:
        return redirect_to_login(request.get_full_path())
    return render(request, "chat.html", {"config": page_config(request)})
