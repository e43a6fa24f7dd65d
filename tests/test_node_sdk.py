"""The openai npm package against the proxy, with the machine's Node.js: tests/node/client.mjs."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from typing import Any

from conftest import CLIENT_KEY, RunningProxy, Sims
from test_use_it_from import node_ready

from proxy.sim.xffuw import CHAT_PREFIX


def test_node_sdk_chat_stream_images_models_and_an_error(start_proxy: Callable[[dict[str, Any]], RunningProxy],
                                                         proxy_config: dict[str, Any], sims: Sims) -> None:
    folder = node_ready()
    sims.xffuw.task_seconds = 0.04
    proxy = start_proxy(proxy_config)
    env = {**os.environ, "PROXY_BASE_URL": proxy.base_url, "PROXY_API_KEY": CLIENT_KEY}
    done = subprocess.run(["node", "client.mjs"], cwd=folder, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["chat"] == report["stream"] == CHAT_PREFIX + "你好"
    assert report["image"].startswith(sims.xffuw_url + "/files/")
    assert {"gpt-4o-mini", "dall-e-3", "product_photo"} <= set(report["models"])
    assert report["retrieved"] == "xffuw"
    assert report["error"] == {"status": 404, "code": "model_not_found", "param": "model",
                               "type": "invalid_request_error"}
    assert sims.xffuw.count("chat") == 2 and sims.xffuw.count("image") == 1
