"""``GET /metrics`` (contract §2, §10): this worker's Prometheus metrics.

* ``OMNI_METRICS_TOKEN`` unset: ``404``, as if there were no such page.
* any method but GET and HEAD: ``405`` ``method_not_allowed`` with ``Allow``
  (exempt from Django's CSRF check, whose HTML 403 page would come first).
* set: ``Authorization: Bearer <token>`` (compared in constant time), else
  ``401`` ``not_authenticated`` in the contract's error shape, with
  ``WWW-Authenticate: Bearer``. A wrong token is no more than a missing one:
  nobody is authenticated, so nothing is forbidden (403) yet.

Cheap: no database, no I/O; the registry (``chat_app.metrics``) is rendered
on the event loop, where the pool's state it reads lives (a few hundred
microseconds). The Prometheus text format (0.0.4) by default, OpenMetrics
when the scraper asks for it. Not under ``/api/``: not in the OpenAPI document.
"""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from prometheus_client.exposition import choose_encoder

from chat_app import metrics
from chat_app.turns import process_counts, registry


def _state() -> dict:
    turns = registry.running()
    return {**process_counts(), "turns": len(turns), "waiting": sum(t.waiting for t in turns)}


metrics.watch(_state)


def _error(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "message": message}}, status=status)


def _authorized(request, token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


@csrf_exempt  # read-only: any other method is the JSON 405 below, not Django's CSRF page
async def metrics_view(request):
    token = getattr(settings, "OMNI_METRICS_TOKEN", None)
    if not token:
        return _error(404, "not_found", "no such page")
    if request.method not in ("GET", "HEAD"):
        response = _error(405, "method_not_allowed", "Method Not Allowed; allowed: GET, HEAD")
        response["Allow"] = "GET, HEAD"
        return response
    if not _authorized(request, token):
        response = _error(401, "not_authenticated", "GET /metrics needs Authorization: Bearer "
                          "<OMNI_METRICS_TOKEN>")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    response = HttpResponse(encode(metrics.REGISTRY), content_type=content_type)
    response["Cache-Control"] = "no-store"
    return response
