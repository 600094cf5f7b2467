"""`imagen serve`: an HTTP API (FastAPI on uvicorn) over finished runs, with dynamic batching, and a web page.

Needs the serve extra: pip install -e ".[serve]".
"""

from imagen.serve.app import ServeSettings, create_app
from imagen.serve.batching import BatchSettings

__all__ = ["ServeSettings", "BatchSettings", "create_app", "serve"]


def serve(runs, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, registries=()) -> int:
    """Load `runs` and answer on host:port until SIGINT / SIGTERM (uvicorn finishes the requests in flight)."""
    import logging
    import sys

    import uvicorn

    # One JSON object per line on standard error, with no prefix, so a log collector can parse each line.
    request_log = logging.getLogger("imagen.serve")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    request_log.addHandler(handler)
    request_log.setLevel(logging.INFO)
    request_log.propagate = False
    app = create_app(runs, settings, registries=registries)  # a run that is not finished fails here, before the port is opened
    # uvicorn's own access log is off: the app writes one JSON line per request instead.
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning", timeout_graceful_shutdown=settings.batch.timeout_s)
    return 0
