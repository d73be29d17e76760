"""Model serving: a deterministic chat model behind /serving-endpoints (see references)."""

import collections
import json
import re
import threading
import time
import uuid

from .config import OWNER
from .errors import BadRequest, EndpointNotFound, InternalError, Throttled

SERVING_ENDPOINTS = {
    "default-llm-endpoint": "local-deterministic-chat-v1",
    "databricks-meta-llama-3-3-70b-instruct": "meta-llama-3.3-70b-instruct-local",
}
POSITIVE_WORDS = {"good", "great", "excellent", "love", "happy", "wonderful", "fantastic",
                  "amazing", "best", "like", "nice", "awesome"}
NEGATIVE_WORDS = {"bad", "terrible", "awful", "hate", "sad", "worst", "horrible", "poor",
                  "angry", "dislike", "broken", "ugly"}
MARKER_RE = re.compile(r"\[(fail|list-content|rate-limit:\d+|slow:\d+(?:\.\d+)?)\]")


class Serving:
    """serving-endpoints list/get and invocations. ``config``: the workspace's ``Config``
    (``llm_latency``)."""

    def __init__(self, config):
        self._config = config
        self._lock = threading.Lock()
        self._rate_limit_seen = collections.Counter()

    @staticmethod
    def _endpoint_info(name):
        return {"name": name, "id": uuid.uuid5(uuid.NAMESPACE_URL, name).hex,
                "creator": OWNER, "creation_timestamp": 1735689600000,
                "state": {"ready": "READY", "config_update": "NOT_UPDATING"},
                "task": "llm/v1/chat",
                "config": {"served_entities": [{"name": SERVING_ENDPOINTS[name],
                                                "entity_name": SERVING_ENDPOINTS[name]}]}}

    def endpoints(self):
        return [self._endpoint_info(n) for n in SERVING_ENDPOINTS]

    def endpoint(self, name):
        if name not in SERVING_ENDPOINTS:
            raise _endpoint_missing(name)
        return self._endpoint_info(name)

    def invoke(self, name, messages):
        """A chat completion for ``messages`` (OpenAI-style), answered by ``chat_answer``."""
        if name not in SERVING_ENDPOINTS:
            raise _endpoint_missing(name)
        latency = self._config["llm_latency"]
        if latency:
            time.sleep(latency)
        if not isinstance(messages, list) or not messages:
            raise BadRequest("Chat requests need a non-empty 'messages' list.")
        texts = [(m.get("role"), _content_text(m.get("content"))) for m in messages
                 if isinstance(m, dict)]
        prompt = next((t for r, t in reversed(texts) if r == "user"), "")
        system = " ".join(t for r, t in texts if r == "system")
        if "[fail]" in prompt:
            raise InternalError("The model failed to answer (the prompt asked for [fail]).")
        limit = re.search(r"\[rate-limit:(\d+)\]", prompt)
        if limit:
            with self._lock:
                seen = self._rate_limit_seen[prompt]
                self._rate_limit_seen[prompt] += 1
            if seen < int(limit.group(1)):
                raise Throttled("Exceeded rate limit for endpoint %s." % name, retry_after="1")
        slow = re.search(r"\[slow:(\d+(?:\.\d+)?)\]", prompt)
        if slow:
            time.sleep(float(slow.group(1)))
        answer = chat_answer(prompt)
        if "json" in system.lower():
            answer = json.dumps({"answer": answer})
        content = answer
        if "[list-content]" in prompt:
            content = [{"type": "reasoning",
                        "summary": [{"type": "summary_text",
                                     "text": "Applied the local deterministic rules."}]},
                       {"type": "text", "text": answer}]
        prompt_tokens = sum(len(t.split()) for _, t in texts)
        completion_tokens = len(answer.split())
        return {
            "id": "chatcmpl-" + uuid.uuid4().hex,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": SERVING_ENDPOINTS[name],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }


def chat_answer(prompt):
    """The deterministic model: rules on the last user message (markers removed)."""
    text = MARKER_RE.sub("", prompt).strip()
    head, sep, rest = text.partition(":")
    rule = head.strip().lower() if sep else ""
    rest = rest.strip()
    if rule == "reverse":
        return rest[::-1]
    if rule == "upper":
        return rest.upper()
    if rule == "sum":
        total = 0.0
        for token in rest.replace(",", " ").split():
            try:
                total += float(token)
            except ValueError:
                pass
        return str(int(total)) if total == int(total) else repr(total)
    if rule == "sentiment":
        words = [w.strip(".,!?;:\"'()").lower() for w in rest.split()]
        score = sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words)
        return "positive" if score > 0 else "negative" if score < 0 else "neutral"
    if rule == "count":
        return str(len(rest.split()))
    return "echo: " + text


def _content_text(content):
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(item.get("text", "")) if isinstance(item, dict) else str(item)
                        for item in content)
    return "" if content is None else str(content)


def _endpoint_missing(name):
    return EndpointNotFound("Endpoint with name '%s' does not exist." % name)

