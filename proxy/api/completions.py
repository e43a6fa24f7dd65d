"""POST /v1/completions: the legacy text completion, each prompt sent as one user message."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from litestar import Request, Response, post
from litestar.response import Stream

from proxy.api.common import drop, first_answer, hold_budget, json_body, json_response, note, stream_failure
from proxy.api.dependencies import CallerDep, RuntimeDep
from proxy.clients import check_model
from proxy.errors import bad_request
from proxy.gateway import ChatResult, StartedChat
from proxy.openai import sse
from proxy.openai.decode import convert
from proxy.openai.errors import error_payload
from proxy.openai.openapi import documented
from proxy.openai.types import (
    COMPLETION_OWN_FIELDS,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Usage,
)
from proxy.openai.usage import prompt_tokens, text_tokens
from proxy.providers.base import ChatAnswer, ChatCall
from proxy.router import Route

MAX_N = 8
MAX_CHOICES = 16  # prompts x n: each one is a paid upstream call
STREAM_PIECE = 24  # characters per streamed text chunk
FINISH_REASONS = frozenset({"stop", "length", "content_filter"})


# What a model that does not chat is, with its article.
_KIND_PHRASES = {"image": "an image", "video": "a video", "audio": "an audio"}


def check_text_route(route: Route, endpoint: str) -> None:
    kind = route.model.kind if route.model else None
    if kind not in (None, "chat"):
        raise bad_request(f"The model '{route.public_id}' is {_KIND_PHRASES.get(kind, 'a non-chat')} model and does "
                          f"not support {endpoint}; use /v1/images/generations.", param="model",
                          code="model_not_supported")


def answer_tokens(answer: ChatAnswer) -> int:
    """The upstream's count, or the estimate chat uses (README: usage estimate)."""
    if answer.completion_tokens is not None:
        return answer.completion_tokens
    return text_tokens(answer.content or "") + 3


def _prompts(prompt: str | list[Any] | None) -> list[str]:
    if prompt is None:
        raise bad_request("Missing required parameter: 'prompt'.", param="prompt")
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("'prompt' must not be an empty array.", param="prompt")
    for i, item in enumerate(prompt):
        if isinstance(item, int | list):
            raise bad_request("Token ids are not supported: the upstreams take text. Send 'prompt' as a string "
                              "or an array of strings.", param="prompt")
        if not isinstance(item, str):
            raise bad_request(f"Invalid type for 'prompt[{i}]': expected a string.", param=f"prompt[{i}]")
    return prompt


def _refuse_unsupported(body: CompletionRequest) -> None:
    # The upstreams answer text only: no token logprobs, no echoed prompt, no infill.
    if body.echo:
        raise bad_request("'echo' is not supported by this proxy: the upstreams do not return the prompt.",
                          param="echo")
    if body.logprobs is not None:
        raise bad_request("'logprobs' is not supported by this proxy: the upstreams return no log "
                          "probabilities.", param="logprobs")
    if body.suffix:
        raise bad_request("'suffix' is not supported by this proxy: the upstreams do not insert text.",
                          param="suffix")
    if body.best_of is not None and body.best_of > 1:
        raise bad_request("'best_of' greater than 1 is not supported by this proxy; use 'n' for several "
                          "completions.", param="best_of")


def _finish(answer: ChatAnswer) -> str:
    return answer.finish_reason if answer.finish_reason in FINISH_REASONS else "stop"  # type: ignore[return-value]


def _usage(prompts: list[str], n: int, results: list[ChatResult]) -> Usage:
    prompt = 0
    for i, text in enumerate(prompts):  # each prompt counted once, whatever n
        first = results[i * n].answer
        prompt += (first.prompt_tokens if first.prompt_tokens is not None
                   else prompt_tokens([{"role": "user", "content": text}]))
    completion = sum(answer_tokens(r.answer) for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


STREAM_NOTE = ("With stream=true: `data: <Completion chunk>` events (finish_reason null until each choice's last "
               "chunk; with stream_options.include_usage a last chunk with choices [] and usage), then "
               "`data: [DONE]`.")


@post("/v1/completions", status_code=200, **documented(Completion, body=CompletionRequest, stream=STREAM_NOTE))
async def completions(request: Request[Any, Any, Any], caller: CallerDep,
                      runtime: RuntimeDep) -> Response[bytes] | Stream:
    """Legacy completions: each prompt becomes one user message to a chat model."""
    gateway = runtime.gateway
    raw = await json_body(request)
    body = convert(raw, CompletionRequest)
    prompts = _prompts(body.prompt)
    _refuse_unsupported(body)
    if not 1 <= body.n <= MAX_N:
        raise bad_request(f"Invalid value for 'n': must be between 1 and {MAX_N}.", param="n")
    if len(prompts) * body.n > MAX_CHOICES:
        raise bad_request(f"Too many completions: prompts x n must be at most {MAX_CHOICES}.", param="prompt")
    note(request, model=body.model)
    route = await gateway.catalogue.resolve(body.model)
    check_text_route(route, "completions")
    check_model(caller, route)
    await hold_budget(request, caller, route, len(prompts) * body.n)
    note(request, upstream=route.provider.name)
    params = {k: v for k, v in raw.items() if k not in COMPLETION_OWN_FIELDS}
    asked = [ChatCall(model=route.upstream_model, messages=[{"role": "user", "content": text}], params=params)
             for text in prompts for _ in range(body.n)]
    calls = gateway.start_chats(route, asked, caller)
    completion_id = "cmpl-" + secrets.token_urlsafe(18)
    created = int(time.time())
    if body.stream:
        first = await first_answer(calls)
        note(request, key=first.key.fingerprint)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        head = Completion(id=completion_id, object="text_completion", created=created, model=body.model, choices=[])
        return Stream(_stream(request, head, prompts, body.n, calls, include_usage), media_type="text/event-stream",
                      headers=sse.HEADERS)
    try:
        results = await asyncio.shield(asyncio.gather(*(c.run for c in calls)))
    except BaseException:  # a call failed, or the request was cancelled: sent calls end recorded
        drop(calls)
        raise
    note(request, key=results[0].key.fingerprint)
    choices = [CompletionChoice(text=r.answer.content or "", index=i, logprobs=None, finish_reason=_finish(r.answer))
               for i, r in enumerate(results)]
    return json_response(Completion(id=completion_id, object="text_completion", created=created, model=body.model,
                                    choices=choices, usage=_usage(prompts, body.n, results)))


async def _stream(request: Request[Any, Any, Any], head: Completion, prompts: list[str], n: int,
                  calls: Sequence[StartedChat], include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        return sse.event(Completion(id=head.id, object="text_completion", created=head.created, model=head.model,
                                    choices=choices, usage=usage))

    results: list[ChatResult] = []
    try:
        for i, pending in enumerate(calls):
            result = await asyncio.shield(pending.run)  # its client gone, a call sent still ends recorded
            results.append(result)
            text = result.answer.content or ""
            pieces = [text[start:start + STREAM_PIECE] for start in range(0, len(text), STREAM_PIECE)] or [""]
            for piece in pieces[:-1]:
                yield chunk([CompletionChoice(text=piece, index=i, logprobs=None, finish_reason=None)])
            yield chunk([CompletionChoice(text=pieces[-1], index=i, logprobs=None,
                                          finish_reason=_finish(result.answer))])
        if include_usage:
            yield chunk([], _usage(prompts, n, results))
    except Exception as error:  # once the stream began, an error can only travel inside it
        yield sse.event(error_payload(stream_failure(request, error)))
    finally:
        drop(calls)  # its client gone: calls not sent yet are cancelled, sent ones end recorded
    yield sse.DONE
