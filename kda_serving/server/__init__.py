"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) on the engine; `kda-serve` starts it.

Depends on the engine only through its public interface (start/generate/abort/stats/shutdown, tokenizer,
model_name, max_model_len), so anything with that interface can be served.
"""

from kda_serving.server.app import create_app
from kda_serving.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
