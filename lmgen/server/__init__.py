"""The OpenAI-compatible HTTP server and the web chat page (``lmgen serve``).

Layout: ``protocol`` (pydantic request/response models), ``serving`` (requests to
engine calls and back), ``errors`` (OpenAI-shaped errors), ``metrics`` (Prometheus),
``app`` (FastAPI routes), ``launch`` (uvicorn, signals), ``static/index.html`` (the page).
"""
