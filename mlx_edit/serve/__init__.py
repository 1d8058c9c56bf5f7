"""`mlx-edit serve`: the models kept warm behind an HTTP API with a job queue.

    from mlx_edit.serve import ServeConfig, create_app
    app = create_app(ServeConfig(model="black-forest-labs/FLUX.1-Fill-dev"))

Layout: config.py (ServeConfig, the server's limits), schema.py (the request schema of
every endpoint), uploads.py (request fields and uploaded images -> a checked EditRequest),
openai_api.py (the OpenAI Images API over the same checks and queue), jobs.py (the bounded priority queue, the one
worker thread, cancellation, the bounded store of results), resident.py (models kept
loaded, evicted LRU by estimated size), preview.py (step previews: latents -> JPEG),
app.py (the FastAPI routes), static/ (the web page served at `/`). Needs the `serve` extra (FastAPI, uvicorn,
python-multipart).
"""

from mlx_edit.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str):
    if name == "create_app":  # FastAPI is imported only when an app is made
        from mlx_edit.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
