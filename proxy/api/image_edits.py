"""POST /v1/images/edits (multipart or JSON) and GET /v1/files/uploads/{name}.

The upstreams take reference images only as URLs: uploaded files (and data: URLs) are
kept by the proxy and served under `[server] public_url` for the upstream to fetch; image
URLs are passed on as they are. Submitting and waiting is the generations' `generate()`.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from litestar import Request, Response, get, post
from litestar.params import FromPath

from proxy.api.common import json_body, note, runtime
from proxy.api.dependencies import CallerDep, RuntimeDep
from proxy.api.forms import FormFile, read_form, whole_number
from proxy.api.images import DEFAULT_MODEL, MAX_N, admit, check_image_route, generate
from proxy.clip import clip
from proxy.errors import Kind, ProxyError, bad_request
from proxy.openai.decode import convert
from proxy.openai.openapi import documented, form_schema
from proxy.openai.types import ImageEditRequest, ImagesResponse
from proxy.providers.base import ImageCall
from proxy.uploads import PATH, Uploads, image_type

# OpenAI fields with no upstream equivalent: read, never rejected, not forwarded.
_OPENAI_FIELDS = frozenset({"prompt", "model", "n", "size", "quality", "response_format", "output_format",
                            "output_compression", "background", "moderation", "user", "image", "image[]", "images",
                            "mask", "partial_images", "stream", "input_fidelity"})
MAX_IMAGES = 16

NO_PUBLIC_URL = ("Uploaded images cannot be used yet: the upstreams fetch reference images by URL, so the proxy "
                 "must serve them at an address they reach. Set [server] public_url in the proxy's config (e.g. "
                 "public_url = \"https://ai.example.com\", where clients and upstreams reach this proxy), or send "
                 "image URLs instead (JSON body: images: [{\"image_url\": \"https://...\"}]).")

EDIT_FORM = form_schema({"image": "binary", "image[]": "binary[]", "prompt": "string", "model": "string",
                         "n": "integer", "size": "string", "response_format": ["url", "b64_json"],
                         "mask": "binary"}, required=["prompt"])


def uploads(request: Request[Any, Any, Any]) -> Uploads:
    """The app's upload store, made on first use."""
    state = request.app.state
    found = state.get("uploads")
    if found is None:
        rt = runtime(request)
        found = state["uploads"] = Uploads(rt.config.images.uploads_max_bytes, shared=rt.shared)
    return found  # type: ignore[no-any-return]


class _References:
    """Collects references in order: URLs as given, image bytes checked now and kept (made
    URLs) only by `urls()`, once the whole request is known to be good."""

    def __init__(self, request: Request[Any, Any, Any]) -> None:
        self.request = request
        self.public_url = runtime(request).config.server.public_url
        self.items: list[str | tuple[bytes, str, str]] = []
        self.kept: list[str] = []  # names of the uploads kept for this request

    def url(self, value: str, where: str) -> None:
        if value.startswith(("http://", "https://")):
            self.items.append(value)
        elif value.startswith("data:"):
            self.data_url(value, where)
        else:
            raise bad_request(f"Invalid value for '{where}': expected an http(s) URL or a data: URL.", param=where)

    def data_url(self, value: str, where: str) -> None:
        header, _, payload = value.partition(",")
        if not header.endswith(";base64"):
            raise bad_request(f"Invalid value for '{where}': a data: URL must be base64 encoded.", param=where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"Invalid value for '{where}': not valid base64.", param=where) from None
        self.file(data, where)

    def file(self, data: bytes, where: str) -> None:
        if self.public_url is None:
            raise bad_request(NO_PUBLIC_URL, param=where)
        kind = image_type(data)
        if kind is None:
            raise bad_request(f"Invalid file for '{where}': expected a PNG, JPEG, WebP or GIF image.", param=where)
        self.items.append((data, *kind))

    async def urls(self, owner: str) -> list[str]:
        """The references as URLs; uploaded images are kept from now on (`kept` names them)."""
        store = uploads(self.request)
        config = runtime(self.request).config
        # A client's share: the space over the clients, never less than one request's worth.
        share = max(store.max_bytes // max(1, len(config.clients)), config.server.max_body_bytes)
        out = []
        try:
            for item in self.items:
                if isinstance(item, str):
                    out.append(item)
                else:
                    name = await store.keep(*item, owner=owner, share=share)
                    self.kept.append(name)
                    out.append(f"{self.public_url}{PATH}{name}")
        except ProxyError:
            await self.drop()
            raise
        return out

    async def drop(self) -> None:
        await uploads(self.request).forget(self.kept)
        self.kept.clear()


async def _from_form(request: Request[Any, Any, Any], refs: _References) -> dict[str, Any]:
    """The text fields of the multipart form; its images go to `refs`."""
    fields: dict[str, Any] = {}
    images: list[tuple[str, str | FormFile]] = []
    for name, value in await read_form(request):
        if name in ("image", "image[]"):
            images.append((name, value))
        elif isinstance(value, str):  # mask and other files: not used
            fields[name] = value
    if not images:
        raise bad_request("Missing required parameter: 'image'.", param="image")
    if len(images) > MAX_IMAGES:
        raise bad_request(f"Too many images: at most {MAX_IMAGES}.", param="image")
    if refs.public_url is None and any(isinstance(v, FormFile) for _, v in images):
        raise bad_request(NO_PUBLIC_URL, param="image")
    for name, value in images:
        if isinstance(value, FormFile):
            if not value.data:
                raise bad_request(f"The file '{clip(value.filename)}' in '{name}' is empty.", param=name)
            refs.file(value.data, name)
        else:
            refs.url(value, name)
    return fields


def _int_field(fields: dict[str, Any], name: str, default: int) -> int:
    value = fields.get(name)
    if value is None or value == "":
        return default
    number = whole_number(value)
    if number is None:
        raise bad_request(f"Invalid value for '{name}': expected an integer in ASCII digits.", param=name)
    return number


@post("/v1/images/edits", status_code=200,
      **documented(ImagesResponse, body=ImageEditRequest, multipart=EDIT_FORM))
async def images_edits(request: Request[Any, Any, Any], caller: CallerDep,
                       runtime: RuntimeDep) -> Response[bytes]:
    """New images from a prompt and reference images (uploaded files or URLs)."""
    gateway = runtime.gateway
    refs = _References(request)
    content_type, _ = request.content_type
    if content_type == "multipart/form-data":
        fields = await _from_form(request, refs)
        prompt = fields.get("prompt")
        if not isinstance(prompt, str):
            raise bad_request("Missing required parameter: 'prompt'.", param="prompt")
        n = _int_field(fields, "n", 1)
        response_format = fields.get("response_format") or None
        if response_format not in (None, "url", "b64_json"):
            raise bad_request("Invalid value for 'response_format': expected 'url' or 'b64_json'.",
                              param="response_format")
        if fields.get("model") == "":
            raise bad_request("Invalid value for 'model': it must not be empty.", param="model")
        model, size = fields.get("model") or DEFAULT_MODEL, fields.get("size") or None
        extra = {k: v for k, v in fields.items() if k not in _OPENAI_FIELDS}
    elif content_type in ("application/json", ""):
        raw = await json_body(request)
        body = convert(raw, ImageEditRequest)
        if not body.images:
            raise bad_request("'images' must contain at least one image.", param="images")
        if len(body.images) > MAX_IMAGES:
            raise bad_request(f"Too many images: at most {MAX_IMAGES}.", param="images")
        for i, image in enumerate(body.images):
            if image.image_url is None:
                raise bad_request(f"'images[{i}]' needs an 'image_url' (file_id is not supported by this proxy).",
                                  param=f"images[{i}].image_url")
        for i, image in enumerate(body.images):
            refs.url(image.image_url or "", f"images[{i}].image_url")
        prompt, n, response_format = body.prompt, body.n, body.response_format
        model, size = body.model or DEFAULT_MODEL, body.size
        extra = {k: v for k, v in raw.items() if k not in _OPENAI_FIELDS}
    else:
        raise bad_request(f"Unsupported Content-Type '{clip(content_type)}': send multipart/form-data (files) or "
                          "application/json (image URLs).")
    if not prompt.strip():
        raise bad_request("'prompt' must not be empty.", param="prompt")
    if not 1 <= n <= MAX_N:
        raise bad_request(f"Invalid value for 'n': must be between 1 and {MAX_N}.", param="n")
    note(request, model=model, references=len(refs.items))
    route = await gateway.catalogue.resolve(model)
    check_image_route(route)
    note(request, upstream=route.provider.name)
    await admit(request, caller, route, n)
    # Only now are uploads kept: a refused request leaves nothing behind.
    call = ImageCall(model=route.upstream_model, prompt=prompt, kind=route.model.kind if route.model else "image",
                     size=size, references=await refs.urls(caller.name), extra=extra)
    try:
        return await generate(request, gateway, caller, route, call, n, response_format)
    except BaseException:
        live = gateway.tasks.live
        if not any(task_id in live for task_id in request.scope["state"].get("access", {}).get("task_ids", ())):
            await refs.drop()  # a failed request whose tasks are over (or never began): nobody fetches them now
        raise


@get(PATH + "{name:str}", **documented(bytes, media_type="application/octet-stream", errors=(404,),
                                       description="The uploaded image, with its own content type."))
async def uploaded_file(request: Request[Any, Any, Any], name: FromPath[str]) -> Response[bytes]:
    """An uploaded reference image. No API key: the unguessable, expiring name is the secret."""
    found = await uploads(request).fetch(name)
    if found is None:
        raise ProxyError(Kind.NOT_FOUND, "No such upload; uploads expire after an hour.")
    return Response(found.data, status_code=200, media_type=found.content_type,
                    headers={"cache-control": "private, max-age=3600", "x-content-type-options": "nosniff"})
