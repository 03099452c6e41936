"""Hearth on Ray Serve: N engine replicas behind Ray's HTTP proxy, with the OpenAI routes of
``hearth serve`` (its FastAPI app is the ingress) and prefix-aware routing between the
replicas. Needs the ``ray`` extra (Hearth's wheel with it: ``pip install 'dist/hearth-<version>-py3-none-any.whl[ray]'``); nothing else in Hearth
imports Ray (an import-linter contract).

``serve run app.ray_serve:app_builder model=M num_replicas=2`` (``builder.py`` says how
the pieces fit and what their limits are; ``packaging/ray/serve_config.yaml`` is a
``serve deploy`` config)."""

from app.ray_serve.builder import app_builder

__all__ = ["app_builder"]
