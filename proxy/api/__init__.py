"""The OpenAI-shaped HTTP edge: one module per surface; ROUTES lists every handler."""

from __future__ import annotations

from proxy.api.chat import chat_completions
from proxy.api.completions import completions
from proxy.api.health import healthz
from proxy.api.image_edits import images_edits, uploaded_file
from proxy.api.images import images_generations
from proxy.api.models import list_models, retrieve_model
from proxy.api.responses import create_response, delete_response, retrieve_response

ROUTES = [chat_completions, completions, create_response, retrieve_response, delete_response, images_generations,
          images_edits, uploaded_file, list_models, retrieve_model, healthz]
