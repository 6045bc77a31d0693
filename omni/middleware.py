"""Every ``/api/`` answer in the contract's error shape, even those Django or
ninja produce before a view runs (unknown path, method not allowed, CSRF)."""


from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import JsonResponse

CODES = {404: "not_found", 405: "method_not_allowed", 403: "forbidden", 400: "bad_request"}


def as_api_error(request, response):
    if (
        request.path.startswith("/api/")
        and response.status_code >= 400
        and not response.get("Content-Type", "").startswith("application/json")
        and not getattr(response, "streaming", False)
    ):
        message = response.reason_phrase
        if response.status_code == 405 and response.get("Allow"):
            message = f"{message}; allowed: {response['Allow']}"
        api_response = JsonResponse(
            {"error": {"code": CODES.get(response.status_code, "error"), "message": message}},
            status=response.status_code,
        )
        if response.get("Allow"):
            api_response["Allow"] = response["Allow"]
        return api_response
    return response


class ApiErrorMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        return as_api_error(request, self.get_response(request))

    async def __acall__(self, request):
        return as_api_error(request, await self.get_response(request))
