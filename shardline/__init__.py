"""Shardline: distributed LLM inference (pipeline and tensor parallel, continuous batching)."""

__version__ = "0.1.0"

from shardline.client import (  # noqa: E402
    AsyncClient,
    Client,
    ClientClosedError,
    CompletionChoice,
    Delta,
    GenerationResult,
    InvalidRequestError,
    RequestTimeoutError,
    ShardlineError,
    UnavailableError,
)
from shardline.sampling import SamplingParams  # noqa: E402

__all__ = [
    "AsyncClient", "Client", "ClientClosedError", "CompletionChoice", "Delta", "GenerationResult",
    "InvalidRequestError", "RequestTimeoutError", "SamplingParams", "ShardlineError", "UnavailableError",
    "__version__",
]
