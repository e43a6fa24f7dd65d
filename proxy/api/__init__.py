"""The OpenAI-shaped HTTP edge: one module per surface; ROUTES lists every handler."""

from __future__ import annotations

from proxy.api.chat import chat_completions
from proxy.api.health import healthz
from proxy.api.images import images_generations
from proxy.api.models import list_models, retrieve_model

ROUTES = [chat_completions, images_generations, list_models, retrieve_model, healthz]
