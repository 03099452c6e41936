"""Hearth's OpenAI-compatible HTTP server (FastAPI), over the engine host every front end
shares. Qt-free; reaches the engine only through ``engine.api`` and ``app.services``.

``create_app(host, api_key=..., allowed_origins=...)`` builds the app; ``hearth serve``
(``app.commands.serve``) runs it with uvicorn."""

from app.server.app import create_app

__all__ = ["create_app"]
