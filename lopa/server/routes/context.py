"""What an app serves, as the routes see it: one :class:`ServedModel` per app, kept in ``app.state.served``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request

from lopa import DecodeConfig
from lopa.server.limits import ServerLimits
from lopa.server.worker import EngineWorker

if TYPE_CHECKING:
    from lopa import LLM


@dataclass(frozen=True)
class ServedModel:
    """The LLM, its engine worker, the name clients use for it, the server's default decode settings and limits."""

    llm: LLM
    worker: EngineWorker
    name: str
    default: DecodeConfig
    limits: ServerLimits
    created: int  # the model card's ``created`` time (seconds since the epoch)

    def card(self) -> dict[str, Any]:
        """The OpenAI model object of ``/v1/models``."""
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "lopa",
            "max_model_len": self.llm.max_context,
        }


def served(request: Request) -> ServedModel:
    """The :class:`ServedModel` of the app answering ``request``."""
    return request.app.state.served
