"""POST /v1/images/edits (multipart uploads and JSON URLs), the upload store, and reference
images for generations: every reference reaches the upstream as a URL it can fetch."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, OTHER_CLIENT_KEY, RunningProxy, Sims
from helpers import error_of
from openai_spec import validate_error, validate_images_response

from proxy.errors import Kind, ProxyError
from proxy.sim.assets import PNG_BYTES
from proxy.uploads import PATH, Uploads, image_type

PUBLIC_URL = "https://proxy.example.test"  # what the config says; the test reaches the proxy on loopback
AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}
PICTURE = "https://images.example.test/product.png"
JPEG_BYTES = b"\xff\xd8\xff\xe0" + bytes(32)
pytestmark = pytest.mark.usefixtures("fast_sim_tasks")  # tests/conftest.py


@pytest.fixture
def public_proxy(start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any]) -> RunningProxy:
    proxy_config["server"] = {"public_url": PUBLIC_URL}
    return start_proxy(proxy_config)


def _fetch_upload(proxy: RunningProxy, url: str) -> httpx.Response:
    """GET an upload URL the upstream was given, on the proxy's loopback address, with no API key."""
    assert url.startswith(PUBLIC_URL + PATH), url
    return httpx.get(proxy.url + url.removeprefix(PUBLIC_URL))


def _edit(client: openai.OpenAI, **kwargs: Any) -> dict[str, Any]:
    raw = client.images.with_raw_response.edit(**kwargs)
    body = raw.http_response.json()
    validate_images_response(body)
    return body


def test_sdk_upload_is_served_to_xffuw_as_a_url(public_proxy: RunningProxy, sims: Sims) -> None:
    body = _edit(public_proxy.client(), image=("cat.png", PNG_BYTES, "image/png"), prompt="make it blue",
                 model="dall-e-3", size="1024x1024")
    assert body["data"][0]["url"].startswith(sims.xffuw_url)
    sent = sims.xffuw.last_image_body
    assert sent is not None and sent["model"] == "gpt-image-2" and sent["prompt"] == "make it blue"
    [url] = sent["images"]
    assert url.endswith(".png") and len(url.rsplit("/", 1)[1]) >= 43  # 256 random bits
    served = _fetch_upload(public_proxy, url)
    assert served.status_code == 200
    assert served.content == PNG_BYTES
    assert served.headers["content-type"] == "image/png"
    assert served.headers["x-content-type-options"] == "nosniff"
    unknown = httpx.get(public_proxy.url + PATH + "x" * 43 + ".png")
    assert unknown.status_code == 404
    validate_error(unknown.json())


def test_several_uploads_go_to_fengyuan_as_image_input_and_product_image(public_proxy: RunningProxy,
                                                                         sims: Sims) -> None:
    body = _edit(public_proxy.client(), image=[("a.png", PNG_BYTES, "image/png"), ("b.jpg", JPEG_BYTES, "image/jpeg")],
                 prompt="a product shot", model="product_photo", n=1)
    assert len(body["data"]) == 1
    sent = sims.fengyuan.last_invoke_body
    assert sent is not None and sent["service_code"] == "product_photo"
    urls = sent["params"]["image_input"]
    assert len(urls) == 2 and sent["params"]["product_image"] == urls[0]
    assert [_fetch_upload(public_proxy, u).headers["content-type"] for u in urls] == ["image/png", "image/jpeg"]
    assert _fetch_upload(public_proxy, urls[1]).content == JPEG_BYTES


def test_upload_without_public_url_is_a_400_that_says_how(client: openai.OpenAI, sims: Sims) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("cat.png", PNG_BYTES, "image/png"), prompt="x", model="dall-e-3")
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "image"
    assert "[server] public_url" in error["message"] and "image_url" in error["message"]
    assert sims.xffuw.count("image") == 0


def test_json_form_with_urls_works_without_public_url(client: openai.OpenAI, proxy: RunningProxy, sims: Sims) -> None:
    # The SDK's generic post: images.edit always sends multipart; the JSON form is for URLs.
    result = client.post("/images/edits", cast_to=openai.types.ImagesResponse,
                         body={"images": [{"image_url": PICTURE}], "prompt": "on a beach", "model": "dall-e-3"})
    assert result.data and result.data[0].url
    assert sims.xffuw.last_image_body is not None
    assert sims.xffuw.last_image_body["images"] == [PICTURE]
    reply = httpx.post(f"{proxy.base_url}/images/edits", headers=AUTH, timeout=30,
                       json={"images": [{"image_url": PICTURE}], "prompt": "again", "model": "product_photo",
                             "response_format": "b64_json"})
    assert reply.status_code == 200, reply.text
    validate_images_response(reply.json())
    assert base64.b64decode(reply.json()["data"][0]["b64_json"]) == PNG_BYTES
    assert sims.fengyuan.last_invoke_body is not None
    assert sims.fengyuan.last_invoke_body["params"]["product_image"] == PICTURE


def test_json_data_url_is_kept_like_an_upload(public_proxy: RunningProxy, sims: Sims) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(PNG_BYTES).decode()
    reply = httpx.post(f"{public_proxy.base_url}/images/edits", headers=AUTH, timeout=30,
                       json={"images": [{"image_url": data_url}], "prompt": "p", "model": "dall-e-3"})
    assert reply.status_code == 200, reply.text
    assert sims.xffuw.last_image_body is not None
    [url] = sims.xffuw.last_image_body["images"]
    assert _fetch_upload(public_proxy, url).content == PNG_BYTES


def test_generate_takes_reference_urls_through_extra_body(client: openai.OpenAI, sims: Sims) -> None:
    client.images.generate(model="dall-e-3", prompt="like this", extra_body={"images": [PICTURE]})
    assert sims.xffuw.last_image_body is not None
    assert sims.xffuw.last_image_body["images"] == [PICTURE]
    client.images.generate(model="fengyuan/image_generation", prompt="like this", extra_body={"images": [PICTURE]})
    assert sims.fengyuan.last_invoke_body is not None
    assert sims.fengyuan.last_invoke_body["params"]["image_input"] == [PICTURE]


def _multipart(proxy: RunningProxy, data: dict[str, str], files: list[tuple[str, tuple[str, bytes, str]]],
               key: str = CLIENT_KEY) -> httpx.Response:
    return httpx.post(f"{proxy.base_url}/images/edits", headers={"authorization": f"Bearer {key}"}, data=data,
                      files=files, timeout=30)


# (text fields, files, the param the 400 must name)
BAD_FORMS: list[tuple[dict[str, str], list[tuple[str, tuple[str, bytes, str]]], str]] = [
    ({"prompt": "p", "model": "dall-e-3"}, [("image", ("a.txt", b"not an image", "text/plain"))], "image"),
    ({"prompt": "p", "model": "dall-e-3"}, [("image", ("a.png", b"", "image/png"))], "image"),
    ({"model": "dall-e-3"}, [("image", ("a.png", PNG_BYTES, "image/png"))], "prompt"),
    ({"prompt": "p"}, [("mask", ("m.png", PNG_BYTES, "image/png"))], "image"),
    ({"prompt": "p", "n": "many"}, [("image", ("a.png", PNG_BYTES, "image/png"))], "n"),
    ({"prompt": "p", "n": "0"}, [("image", ("a.png", PNG_BYTES, "image/png"))], "n"),
    ({"prompt": "p", "n": "1_0"}, [("image", ("a.png", PNG_BYTES, "image/png"))], "n"),  # int() reads 10
    ({"prompt": "p", "n": "\u0661"}, [("image", ("a.png", PNG_BYTES, "image/png"))], "n"),  # Arabic-Indic 1
    ({"prompt": "p", "n": " 1"}, [("image", ("a.png", PNG_BYTES, "image/png"))], "n"),
    ({"prompt": "p", "response_format": "gif"}, [("image", ("a.png", PNG_BYTES, "image/png"))], "response_format"),
    ({"prompt": " ", "model": "dall-e-3"}, [("image", ("a.png", PNG_BYTES, "image/png"))], "prompt"),
]
# (JSON body beside the model, the param the 400 must name)
BAD_JSON: list[tuple[dict[str, Any], str]] = [
    ({"prompt": "p", "images": []}, "images"),
    ({"prompt": "p", "images": [{"file_id": "file_1"}]}, "images[0].image_url"),
    ({"prompt": "p", "images": [{"image_url": "ftp://x/y.png"}]}, "images[0].image_url"),
    ({"prompt": "p", "images": [{"image_url": "data:image/png;base64,!!!"}]}, "images[0].image_url"),
    ({"images": [{"image_url": PICTURE}]}, "prompt"),
]


def test_bad_requests_are_a_400_naming_the_field(public_proxy: RunningProxy, sims: Sims) -> None:
    for data, files, param in BAD_FORMS:  # one proxy for the whole table
        assert error_of(_multipart(public_proxy, data, files))["param"] == param, (data, files)
    for body, param in BAD_JSON:
        reply = httpx.post(f"{public_proxy.base_url}/images/edits", headers=AUTH, json={"model": "dall-e-3", **body})
        assert error_of(reply)["param"] == param, body
    assert sims.xffuw.count("image") == 0


def _raw_form(proxy: RunningProxy, parts: list[tuple[str, bytes]]) -> httpx.Response:
    """A multipart body made by hand from (part headers, part body): what httpx will not send."""
    body = b"".join(b"--b0undary\r\n" + headers.encode() + b"\r\n\r\n" + data + b"\r\n" for headers, data in parts)
    return httpx.post(f"{proxy.base_url}/images/edits", content=body + b"--b0undary--\r\n", timeout=30,
                      headers={**AUTH, "content-type": "multipart/form-data; boundary=b0undary"})


def _text(name: str, extra: str = "") -> str:
    return f'Content-Disposition: form-data; name="{name}"{extra}'


GOOD_PARTS = {"model": (_text("model"), b"dall-e-3"), "prompt": (_text("prompt"), b"blue"),
              "image": (_text("image") + '; filename="a.png"\r\nContent-Type: image/png', PNG_BYTES)}
# (parts replacing the good ones, the param the 400 must name): text that is not text in its charset
BAD_TEXT: list[tuple[dict[str, tuple[str, bytes]], str]] = [
    ({"image": (_text("image"), PNG_BYTES)}, "image"),  # a file sent as a text field (curl -F 'image=<cat.png')
    ({"image": (_text("image") + "; filename*=UTF-8''a.png", PNG_BYTES)}, "image"),  # no plain filename
    ({"prompt": (_text("prompt"), b"\xff")}, "prompt"),
    ({"model": (_text("model"), b"\xff")}, "model"),
    ({"n": (_text("n"), b"\xff")}, "n"),
    ({"style_hint": (_text("style_hint"), b"\xff")}, "style_hint"),  # a field passed on upstream
    ({"prompt": (_text("prompt") + "\r\nContent-Type: text/plain; charset=bogus-xx", b"blue")}, "prompt"),
    ({"prompt": (_text("prompt") + "\r\nContent-Type: text/plain; charset=utf-16", b"odd")}, "prompt"),
]


def test_form_text_that_does_not_decode_is_a_400_naming_the_field(public_proxy: RunningProxy, sims: Sims) -> None:
    for changed, param in BAD_TEXT:
        reply = _raw_form(public_proxy, list({**GOOD_PARTS, **changed}.values()))
        assert error_of(reply)["param"] == param, (changed, reply.text)
    assert sims.xffuw.count("image") == 0
    latin = _raw_form(public_proxy, list({**GOOD_PARTS, "prompt": (
        _text("prompt") + "\r\nContent-Type: text/plain; charset=iso-8859-1", "caf\u00e9".encode("latin-1"))}.values()))
    assert latin.status_code == 200, latin.text
    assert sims.xffuw.last_image_body is not None and sims.xffuw.last_image_body["prompt"] == "caf\u00e9"
    broken = httpx.post(f"{public_proxy.base_url}/images/edits", content=b"--b0undary\r\nnot a header\r\n\r\nx",
                        headers={**AUTH, "content-type": "multipart/form-data; boundary=b0undary"}, timeout=30)
    assert error_of(broken)["param"] is None
    odd_name = httpx.post(f"{public_proxy.base_url}/images/edits", timeout=30,
                          content=b'--b0undary\r\nContent-Disposition: form-data; name="\xff\xfe"\r\n\r\nx\r\n'
                                  b"--b0undary--\r\n",
                          headers={**AUTH, "content-type": "multipart/form-data; boundary=b0undary"})
    assert "Error(" not in error_of(odd_name)["message"], odd_name.text  # no Python exception's repr


def test_other_content_types_and_chat_models_are_refused(public_proxy: RunningProxy, sims: Sims) -> None:
    reply = httpx.post(f"{public_proxy.base_url}/images/edits", headers={**AUTH, "content-type": "text/plain"},
                       content=b"hello")
    assert "multipart/form-data" in error_of(reply)["message"]
    chat_model = _multipart(public_proxy, {"prompt": "p", "model": "gpt-4o-mini"},
                            [("image", ("a.png", PNG_BYTES, "image/png"))])
    assert error_of(chat_model)["code"] == "model_not_supported"
    no_key = httpx.post(f"{public_proxy.base_url}/images/edits",
                        json={"prompt": "p", "images": [{"image_url": PICTURE}]})
    error_of(no_key, 401)


def test_upload_store_bounds_size_and_expires() -> None:
    store = Uploads(max_bytes=100, ttl=0.2)
    first = store.put(b"x" * 60, "image/png", ".png", owner="a", share=100)
    assert store.get(first) is not None and store.size == 60
    with pytest.raises(ProxyError) as full:
        store.put(b"y" * 60, "image/png", ".png", owner="b", share=100)
    assert full.value.kind is Kind.RATE_LIMITED and full.value.retry_after is not None
    with pytest.raises(ProxyError) as huge:
        store.put(b"z" * 101, "image/png", ".png", owner="b", share=1000)
    assert huge.value.kind is Kind.PAYLOAD_TOO_LARGE
    time.sleep(0.25)
    assert store.get(first) is None
    second = store.put(b"y" * 60, "image/png", ".png", owner="b", share=100)  # the expired one made room
    assert store.size == 60 and second != first


def test_each_client_holds_at_most_its_share_of_the_upload_space() -> None:
    store = Uploads(max_bytes=100, ttl=60)
    store.put(b"a" * 40, "image/png", ".png", owner="greedy", share=50)
    with pytest.raises(ProxyError) as over:
        store.put(b"a" * 20, "image/png", ".png", owner="greedy", share=50)
    assert over.value.kind is Kind.RATE_LIMITED and "share" in over.value.message
    modest = store.put(b"b" * 50, "image/png", ".png", owner="modest", share=50)  # unaffected
    assert store.held_by("greedy") == 40 and store.held_by("modest") == 50
    store.drop([modest])
    assert store.held_by("modest") == 0 and store.size == 40 and store.get(modest) is None


def test_image_type_sniffing() -> None:
    assert image_type(PNG_BYTES) == ("image/png", ".png")
    assert image_type(JPEG_BYTES) == ("image/jpeg", ".jpg")
    assert image_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == ("image/webp", ".webp")
    assert image_type(b"GIF89a....") == ("image/gif", ".gif")
    assert image_type(b"XXXX\x00\x00\x00\x00WEBP") is None
    assert image_type(b"<svg/>") is None


def test_chat_image_url_parts_reach_xffuw_unchanged(client: openai.OpenAI, sims: Sims) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(PNG_BYTES).decode()
    messages: list[Any] = [
        {"role": "system", "content": "You describe pictures."},
        {"role": "user", "content": [
            {"type": "text", "text": "Compare these."},
            {"type": "image_url", "image_url": {"url": PICTURE, "detail": "high"}},
            {"type": "image_url", "image_url": {"url": data_url}},
        ]},
    ]
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert reply.choices[0].message.content is not None
    assert sims.xffuw.last_chat_body is not None
    assert sims.xffuw.last_chat_body["messages"] == messages


def test_a_refused_request_keeps_no_upload(public_proxy: RunningProxy, sims: Sims) -> None:
    good = ("image", ("a.png", PNG_BYTES, "image/png"))
    bad_file = _multipart(public_proxy, {"prompt": "p", "model": "dall-e-3"},
                          [good, ("image", ("b.txt", b"plain text", "text/plain"))])
    assert error_of(bad_file)["param"] == "image"
    unknown_model = _multipart(public_proxy, {"prompt": "p", "model": "no-such-model"}, [good])
    assert error_of(unknown_model, 404)["code"] == "model_not_found"
    app = public_proxy.server.server.config.app
    store = app.state.get("uploads")
    assert store is None or store.size == 0
    _edit(public_proxy.client(), image=("a.png", PNG_BYTES, "image/png"), prompt="p", model="dall-e-3")
    assert app.state["uploads"].size == len(PNG_BYTES)


def test_upload_names_can_be_kept_out_of_logs() -> None:
    from proxy.uploads import loggable_path

    assert loggable_path(PATH + "s3cr3t-name.png") == PATH + "<name>"
    assert loggable_path("/v1/images/edits") == "/v1/images/edits"


def test_refused_uploads_are_not_kept_and_leave_room_for_others(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    """A client with a spent budget once filled the shared upload space with refused requests."""
    proxy_config["server"] = {"public_url": PUBLIC_URL}
    proxy_config["images"] = {"uploads_max_bytes": 8 * 1024 * 1024}
    proxy_config["clients"][0]["budget"] = 0
    proxy = start_proxy(proxy_config)
    big = PNG_BYTES + bytes(2 * 1024 * 1024)
    for _ in range(10):
        refused = _multipart(proxy, {"prompt": "p", "model": "gpt-image-2"}, [("image", ("a.png", big, "image/png"))])
        assert error_of(refused, 429)["code"] == "insufficient_quota"
    not_allowed = _multipart(proxy, {"prompt": "p", "model": "no-such-model"}, [("image", ("a.png", big, "image/png"))])
    assert error_of(not_allowed, 404)["code"] == "model_not_found"
    failed = _multipart(proxy, {"prompt": "fails [fail]", "model": "gpt-image-2"},
                        [("image", ("a.png", PNG_BYTES, "image/png"))], key=OTHER_CLIENT_KEY)
    assert error_of(failed, 502)["code"] == "upstream_task_failed"
    assert sims.xffuw.last_image_body is not None
    (failed_url,) = sims.xffuw.last_image_body["images"]
    assert _fetch_upload(proxy, failed_url).status_code == 404  # a failed request's upload is dropped
    ok = _multipart(proxy, {"prompt": "p", "model": "gpt-image-2"}, [("image", ("b.png", PNG_BYTES, "image/png"))],
                    key=OTHER_CLIENT_KEY)
    assert ok.status_code == 200, ok.text
    (kept_url,) = sims.xffuw.last_image_body["images"]
    assert _fetch_upload(proxy, kept_url).status_code == 200
