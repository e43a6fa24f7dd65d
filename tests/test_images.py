"""POST /v1/images/generations through the proxy with the official SDK: tasks waited out upstream."""

from __future__ import annotations

import base64
import itertools
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, RunningProxy, Sims
from helpers import sdk_error_body
from openai_spec import validate_error, validate_images_response

from proxy.sim.assets import MP4_BYTES, PNG_BYTES

POLL_INTERVAL = 0.2  # tests/conftest.py proxy_config["tasks"]["poll_interval"]
FIRST_POLL = 0.05
SLACK = 0.03  # the sim stamps a call when it answers, not when it arrives
pytestmark = pytest.mark.usefixtures("fast_sim_tasks")  # tests/conftest.py


def _generate(client: openai.OpenAI, **kwargs: Any) -> tuple[dict[str, Any], httpx.Headers]:
    """images.generate through the SDK; the raw body (checked against the spec) and headers."""
    raw = client.images.with_raw_response.generate(**kwargs)
    assert raw.http_response.status_code == 200
    body = raw.http_response.json()
    validate_images_response(body)
    parsed = raw.parse()
    assert [d.url for d in parsed.data] == [d.get("url") for d in body["data"]]
    return body, raw.headers


def _task_ids(headers: httpx.Headers) -> list[str]:
    value = headers.get("x-proxy-task-ids", "")
    return [t for t in value.split(",") if t]


def _times(sim: Any, endpoint: str) -> list[float]:
    return [c.at for c in sim.calls if c.endpoint == endpoint]


def _xffuw_url(sims: Sims, ext: str = "png") -> re.Pattern[str]:
    return re.compile(re.escape(f"{sims.xffuw_url}/files/xf-") + r"\d+\." + ext)


def _fengyuan_url(sims: Sims, ext: str = "png") -> re.Pattern[str]:
    return re.compile(re.escape(f"{sims.fengyuan_url}/files/fy-") + r"task_[0-9a-f]+\." + ext)


# ---- xffuw ----------------------------------------------------------------------------


def test_xffuw_async_task_is_polled_until_done(client: openai.OpenAI, sims: Sims) -> None:
    sims.xffuw.task_seconds = 0.3
    started = time.monotonic()
    body, headers = _generate(client, model="gpt-image-2", prompt="a red panda")
    assert set(body) >= {"created", "data"}
    assert abs(body["created"] - time.time()) < 60
    assert len(body["data"]) == 1
    url = body["data"][0]["url"]
    assert _xffuw_url(sims).fullmatch(url), url
    # the URL is the one task.php gave for the task image.php started
    (task,) = sims.xffuw.tasks.values()
    assert url == f"{sims.xffuw_url}/files/xf-{task.id}.png"
    assert sims.xffuw.last_image_body == {"model": "gpt-image-2", "prompt": "a red panda"}
    assert httpx.get(url).content == PNG_BYTES
    assert len(_task_ids(headers)) == 1

    polls = _times(sims.xffuw, "task")
    assert len(polls) >= 2  # 0.3 s task, first poll at 0.05 s, then every 0.2 s
    (submitted,) = _times(sims.xffuw, "image")
    assert polls[0] - submitted >= FIRST_POLL - SLACK
    gaps = [b - a for a, b in itertools.pairwise(polls)]
    assert all(gap >= POLL_INTERVAL - SLACK for gap in gaps), gaps
    # not wasteful either: at most one poll per interval, and done soon after the task is
    assert len(polls) <= 1 + (time.monotonic() - started) / POLL_INTERVAL
    assert sims.xffuw.count("task") == len(polls)


def test_xffuw_immediate_result_is_not_polled(client: openai.OpenAI, sims: Sims) -> None:
    # flux-schnell always answers result_url; [instant] makes gpt-image-2 do so too
    for model, prompt in (("flux-schnell", "a lighthouse"), ("gpt-image-2", "a lighthouse [instant]")):
        before = sims.xffuw.count("image")
        body, headers = _generate(client, model=model, prompt=prompt)
        (item,) = body["data"]
        assert _xffuw_url(sims).fullmatch(item["url"]), (model, item)
        assert sims.xffuw.count("image") == before + 1
        assert len(_task_ids(headers)) == 1
    assert sims.xffuw.count("task") == 0


# ---- Fengyuan -------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [0, 1, 2, 3])
@pytest.mark.parametrize("envelope", ["documented", "observed"])
def test_fengyuan_task_result_found_wherever_it_is(
    client: openai.OpenAI, sims: Sims, envelope: str, variant: int
) -> None:
    sims.fengyuan.envelope = envelope  # type: ignore[assignment]
    sims.fengyuan.result_variant = variant
    body, headers = _generate(client, model="fengyuan/image_generation", prompt="山水画")
    (task,) = sims.fengyuan.tasks.values()
    assert body["data"] == [{"url": f"{sims.fengyuan_url}/files/fy-{task.id}.png"}]
    assert sims.fengyuan.count("invoke") == 1
    assert sims.fengyuan.count("task") + sims.fengyuan.count("task_list") >= 1  # polled, alone or listed
    assert sims.xffuw.count("image") == 0
    sent = sims.fengyuan.last_invoke_body
    assert sent is not None
    assert sent["service_code"] == "image_generation" and sent["params"]["prompt"] == "山水画"
    assert len(_task_ids(headers)) == 1


def test_fengyuan_finished_at_invoke_is_not_polled(client: openai.OpenAI, sims: Sims) -> None:
    for envelope in ("documented", "observed"):
        sims.fengyuan.envelope = envelope  # type: ignore[assignment]
        before = sims.fengyuan.count("invoke")
        body, _ = _generate(client, model="fengyuan/image_generation", prompt="a kite [instant]")
        (item,) = body["data"]
        assert _fengyuan_url(sims).fullmatch(item["url"]), (envelope, item)
        assert sims.fengyuan.count("invoke") == before + 1
    assert sims.fengyuan.count("task") == 0


def test_provider_prefix_picks_the_upstream(client: openai.OpenAI, sims: Sims) -> None:
    body, _ = _generate(client, model="xffuw/image_generation", prompt="a bridge")
    (item,) = body["data"]
    assert _xffuw_url(sims).fullmatch(item["url"]), item
    assert sims.xffuw.last_image_body is not None
    assert sims.xffuw.last_image_body["model"] == "image_generation"
    assert (sims.xffuw.count("image"), sims.fengyuan.count("invoke")) == (1, 0)

    body, _ = _generate(client, model="fengyuan/image_generation", prompt="a bridge")
    (item,) = body["data"]
    assert _fengyuan_url(sims).fullmatch(item["url"]), item
    assert sims.fengyuan.last_invoke_body is not None
    assert sims.fengyuan.last_invoke_body["service_code"] == "image_generation"
    assert (sims.xffuw.count("image"), sims.fengyuan.count("invoke")) == (1, 1)


# ---- response shapes --------------------------------------------------------------------


def test_b64_json_is_the_served_png(client: openai.OpenAI, sims: Sims) -> None:
    for model in ("gpt-image-2", "fengyuan/image_generation"):
        body, _ = _generate(client, model=model, prompt="a tiny gradient", response_format="b64_json")
        (item,) = body["data"]
        assert "url" not in item, model
        decoded = base64.b64decode(item["b64_json"], validate=True)
        assert decoded.startswith(b"\x89PNG"), model
        assert decoded == PNG_BYTES, model
    # the proxy fetched each result once from the upstream's file server
    assert (sims.xffuw.count("file"), sims.fengyuan.count("file")) == (1, 1)


@pytest.mark.parametrize("model", ["gpt-image-2", "fengyuan/image_generation"])
def test_n_two_submits_two_tasks_at_once(client: openai.OpenAI, sims: Sims, model: str) -> None:
    # Every upstream answer takes 0.3 s: one after the other, the two submits would end >= 0.3 s apart.
    sim = sims.fengyuan if model.startswith("fengyuan/") else sims.xffuw
    submit = "invoke" if sim is sims.fengyuan else "image"
    client.models.list()  # load the catalogue before the upstream slows down
    sim.faults.latency = 0.3
    body, headers = _generate(client, model=model, prompt="twins", n=2)
    urls = [d["url"] for d in body["data"]]
    assert len(urls) == 2 and len(set(urls)) == 2
    assert len(sim.tasks) == 2
    ext_ids = {re.sub(r"^.*/files/(xf|fy)-|\.png$", "", url) for url in urls}
    assert ext_ids == set(sim.tasks), (urls, list(sim.tasks))
    ids = _task_ids(headers)
    assert len(ids) == 2 and len(set(ids)) == 2
    times = _times(sim, submit)
    assert len(times) == 2
    assert abs(times[0] - times[1]) < 0.15, times  # submitted concurrently
    assert sim.count("task") + sim.count("task_list") >= 1  # polled, each alone or all in a list


# ---- parameters sent upstream -----------------------------------------------------------


SIZES = {
    "1792x1024": {"aspect_ratio": "16:9", "size": "2K"},
    "1024x1024": {"aspect_ratio": "1:1", "size": "1K"},
    "1024x1792": {"aspect_ratio": "9:16", "size": "2K"},
    "1536x1024": {"aspect_ratio": "3:2", "size": "1K"},
}


def test_fengyuan_size_is_translated(client: openai.OpenAI, sims: Sims) -> None:
    for size, expected in SIZES.items():
        _generate(client, model="fengyuan/image_generation", prompt="a dune [instant]", size=size,  # type: ignore[arg-type]
                  quality="hd", style="vivid")
        sent = sims.fengyuan.last_invoke_body
        assert sent is not None
        params = sent["params"]
        assert {k: params.get(k) for k in expected} == expected, size
        assert "quality" not in params and "style" not in params
        assert set(params) == {"prompt", "aspect_ratio", "size"}, size


def test_openai_only_fields_are_not_sent_to_xffuw(client: openai.OpenAI, sims: Sims) -> None:
    _generate(client, model="flux-schnell", prompt="a dune", size="1024x1024", quality="hd", style="vivid",
              user="u-1")
    assert sims.xffuw.last_image_body == {"model": "flux-schnell", "prompt": "a dune"}


def test_unknown_extension_field_reaches_fengyuan_params(client: openai.OpenAI, sims: Sims) -> None:
    _generate(client, model="fengyuan/image_generation", prompt="a tall tower [instant]",
              extra_body={"aspect_ratio": "9:16", "negative_prompt": "blur"})
    sent = sims.fengyuan.last_invoke_body
    assert sent is not None
    assert sent["params"]["aspect_ratio"] == "9:16"
    assert sent["params"]["negative_prompt"] == "blur"
    assert sent["service_code"] == "image_generation"


def test_reference_images_reach_xffuw_as_images(client: openai.OpenAI, sims: Sims) -> None:
    ref = "https://example.com/ref/cat.png"
    _generate(client, model="flux-schnell", prompt="this cat, in space", extra_body={"images": [ref]})
    assert sims.xffuw.last_image_body == {"model": "flux-schnell", "prompt": "this cat, in space", "images": [ref]}


def test_reference_images_reach_fengyuan_as_image_input(client: openai.OpenAI, sims: Sims) -> None:
    refs = ["https://example.com/ref/bottle.png", "https://example.com/ref/bottle-side.png"]
    # product_photo refuses an invoke without product_image
    for model, service in (("fengyuan/image_generation", "image_generation"), ("product_photo", "product_photo")):
        body, _ = _generate(client, model=model, prompt="this bottle on a beach [instant]",
                            extra_body={"images": refs})
        sent = sims.fengyuan.last_invoke_body
        assert sent is not None
        assert sent["service_code"] == service
        assert sent["params"]["image_input"] == refs, service
        assert sent["params"]["product_image"] == refs[0], service
        assert "images" not in sent["params"], service
        # echoed references are never mistaken for results
        (item,) = body["data"]
        assert _fengyuan_url(sims).fullmatch(item["url"]), (service, item)


# ---- failures -----------------------------------------------------------------------------


FAILURES = [  # model, Fengyuan envelope, the reason the upstream gives
    ("gpt-image-2", "documented", "生成失败:simulated failure ([fail] in prompt)"),
    ("fengyuan/image_generation", "documented", "生成失败:simulated failure ([fail] in prompt)"),
    ("fengyuan/image_generation", "observed", "AI 服务生成失败 (simulated [fail])"),
]


def test_failed_task_is_a_502_naming_reason_and_task(client: openai.OpenAI, sims: Sims) -> None:
    for model, envelope, reason in FAILURES:
        case = (model, envelope)
        sims.fengyuan.envelope = envelope  # type: ignore[assignment]
        sim = sims.fengyuan if model.startswith("fengyuan/") else sims.xffuw
        submit = "invoke" if sim is sims.fengyuan else "image"
        before = sim.count(submit)
        with pytest.raises(openai.InternalServerError) as caught:
            client.images.generate(model=model, prompt="a broken vase [fail]")
        assert caught.value.status_code == 502, case
        error = sdk_error_body(caught.value)
        assert error["code"] == "upstream_task_failed", case
        assert error["type"] == "server_error", case
        assert reason in error["message"], (case, error["message"])
        headers = caught.value.response.headers
        assert headers.get("x-should-retry") == "false", case
        (task_id,) = _task_ids(headers)
        assert task_id in error["message"], case
        assert sim.count(submit) == before + 1, case  # a failed paid task is not resubmitted


def test_task_that_never_ends_times_out(
    start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims
) -> None:
    proxy_config["tasks"]["timeout"] = 1.0
    client = start_proxy(proxy_config).client()
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client.images.generate(model="gpt-image-2", prompt="an endless staircase [never]")
    elapsed = time.monotonic() - started
    assert caught.value.status_code == 504
    error = sdk_error_body(caught.value)
    assert error["code"] == "upstream_timeout"
    (task_id,) = _task_ids(caught.value.response.headers)
    assert task_id in error["message"]
    assert 0.9 <= elapsed < 3.0
    polls = sims.xffuw.count("task")
    # polled until the deadline, never faster than the interval (its creeping progress spaces them out)
    assert 2 <= polls <= 1 + 1.0 / POLL_INTERVAL + 1


def test_moderation_refusal_is_content_policy_violation(client: openai.OpenAI, sims: Sims) -> None:
    cases = [("fengyuan/image_generation", "documented"), ("fengyuan/image_generation", "observed"),
             ("gpt-image-2", None)]
    for model, envelope in cases:
        if envelope is not None:
            sims.fengyuan.envelope = envelope  # type: ignore[assignment]
        sim = sims.fengyuan if model.startswith("fengyuan/") else sims.xffuw
        submit = "invoke" if sim is sims.fengyuan else "image"
        before = sim.count(submit)
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(model=model, prompt="something forbidden [blocked]")
        assert caught.value.status_code == 400
        error = sdk_error_body(caught.value)
        assert error["code"] == "content_policy_violation", (model, envelope, error)
        assert error["type"] == "invalid_request_error"
        assert sim.count(submit) == before + 1, (model, envelope)  # not retried on another key


# ---- request validation ---------------------------------------------------------------------


def test_model_must_exist_and_make_images(client: openai.OpenAI, sims: Sims) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="gpt-4o-mini", prompt="a cat")
    error = sdk_error_body(caught.value)
    assert error["param"] == "model"
    assert "chat" in error["message"]
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(model="no-such-painter", prompt="a cat")
    error = sdk_error_body(caught.value)
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert sims.xffuw.count("image") == 0 and sims.xffuw.count("chat") == 0


BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "a cat", "n": 0}, "n"),
    ({"prompt": "a cat", "n": 11}, "n"),
    ({"prompt": "a cat", "response_format": "gif"}, "response_format"),
    ({"prompt": "a cat", "extra_body": {"images": ["file:///etc/passwd"]}}, "images[0]"),
]


def test_bad_fields_are_a_400_naming_the_field(proxy: RunningProxy, client: openai.OpenAI, sims: Sims) -> None:
    # the SDK cannot leave out prompt: send that one raw
    reply = httpx.post(f"{proxy.base_url}/images/generations", headers={"authorization": f"Bearer {CLIENT_KEY}"},
                       json={"model": "gpt-image-2"})
    assert reply.status_code == 400
    validate_error(reply.json())
    assert reply.json()["error"]["param"] == "prompt"
    for kwargs, param in BAD_FIELDS:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(model="gpt-image-2", **kwargs)
        error = sdk_error_body(caught.value)
        assert error["param"] == param, kwargs
        assert error["type"] == "invalid_request_error", kwargs
    assert sims.xffuw.count("image") == 0


# ---- aliases and other media ------------------------------------------------------------------


def test_dall_e_3_alias_routes_to_gpt_image_2(client: openai.OpenAI, sims: Sims) -> None:
    body, _ = _generate(client, model="dall-e-3", prompt="an astronaut riding a horse")
    assert sims.xffuw.last_image_body is not None
    assert sims.xffuw.last_image_body["model"] == "gpt-image-2"
    assert _xffuw_url(sims).fullmatch(body["data"][0]["url"])


def test_video_model_answers_the_upstream_url(client: openai.OpenAI, sims: Sims) -> None:
    body, _ = _generate(client, model="kling-video", prompt="waves at dusk")
    (item,) = body["data"]
    (task,) = sims.xffuw.tasks.values()
    assert item["url"] == f"{sims.xffuw_url}/files/xf-{task.id}.mp4"
    assert httpx.get(item["url"]).content == MP4_BYTES

    body, _ = _generate(client, model="image-video", prompt="waves at dusk")  # Fengyuan's video service
    (item,) = body["data"]
    (task,) = sims.fengyuan.tasks.values()
    assert item["url"] == f"{sims.fengyuan_url}/files/fy-{task.id}.mp4"
    assert httpx.get(item["url"]).content == MP4_BYTES


# ---- the default response_format ------------------------------------------------------------


@pytest.mark.parametrize(("table", "model", "expected"), [
    ({}, "gpt-image-2", "b64_json"),  # OpenAI answers gpt-image-* with b64_json only
    ({}, "gpt-image-1.5", "b64_json"),
    ({}, "chatgpt-image-latest", "b64_json"),
    ({}, "xffuw/gpt-image-2", "b64_json"),  # a provider prefix does not hide the model
    ({}, "GPT-Image-1", "b64_json"),
    ({}, "dall-e-3", "url"),
    ({}, "dall-e-2", "url"),
    ({}, "flux-schnell", "url"),
    ({}, "fengyuan/image_generation", "url"),
    ({"dall-e-3": "b64_json"}, "dall-e-3", "b64_json"),  # by alias
    ({"fengyuan/*": "b64_json"}, "fengyuan/image_generation", "b64_json"),
    ({"image_*": "b64_json"}, "fengyuan/image_generation", "b64_json"),
    ({"gpt-image-*": "url"}, "gpt-image-2", "url"),  # the config wins over the built-in default
    ({"gpt-image-2": "url", "gpt-image-*": "b64_json"}, "gpt-image-2", "url"),  # first match wins
    ({"*": "b64_json"}, "dall-e-2", "b64_json"),
])
def test_default_response_format_by_model(table: dict[str, str], model: str, expected: str) -> None:
    from proxy.config import ImagesConfig

    assert ImagesConfig(response_format=table).default_format(model) == expected  # type: ignore[arg-type]


def test_a_bad_default_response_format_is_a_config_error() -> None:
    from proxy.config import ConfigError, parse_config

    raw = {"clients": [{"name": "a", "key": "sk-a"}], "images": {"response_format": {"gpt-image-*": "png"}}}
    with pytest.raises(ConfigError, match=r"images\.response_format"):
        parse_config(raw)


def test_gpt_image_models_answer_b64_json_unless_asked_for_urls(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    """As OpenAI's clients assume (the AI SDK's generateImage, pydantic-ai): no response_format,
    b64_json for gpt-image-*; url for the rest; an explicit response_format always wins."""
    proxy_config["images"] = {"response_format": {"dall-e-2": "b64_json"}}
    proxy_config["aliases"]["chatgpt-image-latest"] = "xffuw/gpt-image-2"
    proxy_config["aliases"]["dall-e-2"] = "xffuw/flux-schnell"
    client = start_proxy(proxy_config).client()
    for model in ("gpt-image-2", "xffuw/gpt-image-2", "chatgpt-image-latest", "dall-e-2"):
        body, _ = _generate(client, model=model, prompt="一只橘猫")
        assert [set(d) for d in body["data"]] == [{"b64_json"}], model
        assert base64.b64decode(body["data"][0]["b64_json"]) == PNG_BYTES
    for model in ("dall-e-3", "fengyuan/image_generation"):
        body, _ = _generate(client, model=model, prompt="一只橘猫")
        assert [set(d) for d in body["data"]] == [{"url"}], model
    explicit, _ = _generate(client, model="gpt-image-2", prompt="一只橘猫", response_format="url")
    assert _xffuw_url(sims).fullmatch(explicit["data"][0]["url"])
    explicit, _ = _generate(client, model="dall-e-3", prompt="一只橘猫", response_format="b64_json")
    assert set(explicit["data"][0]) == {"b64_json"}
    reply = httpx.post(f"{client.base_url}images/edits", headers={"authorization": f"Bearer {CLIENT_KEY}"},
                       json={"model": "gpt-image-2", "prompt": "make it blue",
                             "images": [{"image_url": "https://images.example.test/cat.png"}]}, timeout=30)
    assert reply.status_code == 200 and set(reply.json()["data"][0]) == {"b64_json"}  # edits too
