"""Running the real SDK and CLI directly (no pipeline) against the offline model."""

import asyncio

from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ResultMessage,
    TextBlock,
    query,
)


def sdk_options(model, config_dir, workdir, *, store=True, **extra) -> ClaudeAgentOptions:
    """Options for one CLI run: the offline model, its own config dir, no
    tools, transcripts mirrored to ``DjangoSessionStore`` unless ``store=False``."""
    from sessions_app.transcripts import DjangoSessionStore

    config_dir.mkdir(exist_ok=True)
    if store:
        extra.setdefault("session_store", DjangoSessionStore())
    return ClaudeAgentOptions(
        env={
            "ANTHROPIC_BASE_URL": model.base_url,
            "ANTHROPIC_API_KEY": "offline",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CONFIG_DIR": str(config_dir),
        },
        cwd=str(workdir),
        system_prompt="You are a test.",
        allowed_tools=[],
        **extra,
    )


async def ask(prompt, options):
    """(session id, reply text) of one turn."""
    session_id, texts = None, []
    async with asyncio.timeout(120):
        async for message in query(prompt=prompt, options=options):
            if isinstance(message, AssistantMessage):
                texts += [b.text for b in message.content if isinstance(b, TextBlock)]
            elif isinstance(message, ResultMessage):
                session_id = message.session_id
    return session_id, "".join(texts)
