from sessions_app.models import SessionMapping

from chat_app.tools import omni_tool


@omni_tool("count_threads", "How many conversations the user has.", {"type": "object", "properties": {}})
async def count_threads(args, caller):
    n = await SessionMapping.objects.filter(resource_id=caller.resource_id).acount()
    return f"{caller.resource_id} has {n} conversations"
