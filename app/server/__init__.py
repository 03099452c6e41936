"""Hearth's OpenAI-compatible HTTP server (FastAPI), over the engine host every front end
shares. Qt-free; reaches the engine only through ``engine.api`` and ``app.services``.

``create_app(host, api_key=..., allowed_origins=...)`` builds the app; ``hearth serve``
(``app.commands.serve``) runs it with uvicorn."""

__all__ = ["create_app"]


def __getattr__(name: str):
    # Imported on first use: ``hearth serve``'s parser reads ``app.server.limits`` without
    # loading FastAPI (every other command starts faster for it).
    if name == "create_app":
        from app.server.app import create_app

        return create_app
    raise AttributeError(f"module 'app.server' has no attribute {name!r}")
