"""Token counts when the upstream gives none: an estimate, documented in the README.

CJK characters count one token each; other text one token per four characters (rounded
up); each message adds 4 tokens of framing and every reply 3, as OpenAI's chat format does.
"""

from __future__ import annotations

import math
import re
from typing import Any

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")


def text_tokens(text: str) -> int:
    cjk = len(_CJK.findall(text))
    return cjk + math.ceil((len(text) - cjk) / 4)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return 3 + sum(4 + text_tokens(_content_text(m.get("content"))) for m in messages)
