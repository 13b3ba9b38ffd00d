"""Error cases over raw HTTP: OpenAI's error shape and status for each, the API key, the body
cap, the full queue's 503, disconnects stopping generation, and the server serving afterwards."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


def post(served, body, **kw):
    return httpx.post(served.url + CHAT, json=body, timeout=60, **kw)


def assert_error(resp, status, param=None, needle=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param
    if needle is not None:
        assert needle in err["message"]
    return err


@pytest.mark.parametrize(
    "body, param, needle",
    [
        ({"messages": USER, "n": 2}, "n", "'n' > 1"),
        ({"messages": USER, "tools": [{"type": "function"}]}, "tools", "tool calling"),
        ({"messages": USER, "logprobs": True}, "logprobs", "logprobs"),
        ({"messages": USER, "top_logprobs": 2}, "top_logprobs", None),
        ({"messages": USER, "frequency_penalty": 0.5}, "frequency_penalty", None),
        ({"messages": USER, "response_format": {"type": "json_object"}}, "response_format", None),
        ({"messages": USER, "bogus": 1}, "bogus", "unrecognized"),
        ({"messages": USER, "temperature": 3}, "temperature", "between"),
        ({"messages": USER, "temperature": "hot"}, "temperature", "number"),
        ({"messages": USER, "max_tokens": 0}, "max_tokens", None),
        ({"messages": USER, "max_tokens": 65}, "max_tokens", "64"),  # the cap
        ({"messages": USER, "stop": [1]}, "stop", None),
        ({"messages": USER, "stream": "yes"}, "stream", None),
        ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options", None),
        ({"messages": []}, "messages", None),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", "last message"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", None),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", None),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None, "text"),
        ([1, 2], None, "JSON object"),
    ],
)
def test_bad_requests_get_400(served, body, param, needle):
    assert_error(post(served, body), 400, param, needle)


def test_malformed_json_route_model_and_size(served):
    bad = httpx.post(served.url + CHAT, content=b"{nope", timeout=30)
    assert_error(bad, 400, needle="not valid JSON")
    assert_error(httpx.get(served.url + "/v1/nothing", timeout=30), 404)
    assert_error(httpx.get(served.url + CHAT, timeout=30), 405)
    err = assert_error(post(served, {"model": "other", "messages": USER}), 404, "model")
    assert err["code"] == "model_not_found"
    big = {"messages": [{"role": "user", "content": "x" * 30_000}]}  # cap is 20 000 bytes
    assert_error(post(served, big), 413)
    # Without a Content-Length (chunked), the cap holds as the body streams in.
    chunks = iter([b'{"messages": [{"role": "user", "content": "', b"x" * 30_000, b'"}]}'])
    assert_error(httpx.post(served.url + CHAT, content=chunks, timeout=30), 413)
    ok = post(served, {"messages": USER, "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_api_key(tiny_chat_dir, server_kit):
    from openchatkit.inference.server_app import create_app

    service = server_kit.build_service(tiny_chat_dir, api_key="s3cret")[0]
    with server_kit.ServerThread(create_app(service)) as server:
        url = server.url
        body = {"messages": USER, "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            resp = httpx.post(url + CHAT, json=body, headers=headers, timeout=30)
            assert assert_error(resp, 401)["code"] == "invalid_api_key"
        assert_error(httpx.get(url + "/v1/models", timeout=30), 401)
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.post(url + CHAT, json=body, headers=good, timeout=30).status_code == 200
        assert httpx.get(url + "/v1/models", headers=good, timeout=30).status_code == 200
        # The page and the health check need no key (the page asks for it).
        assert httpx.get(url + "/health", timeout=30).json()["auth"] is True
        assert httpx.get(url + "/", timeout=30).status_code == 200


def test_queue_full_gets_503_with_retry_after(served):
    """max_in_flight 6: with generation held, a 7th request is refused at once."""
    served.backend.gate = threading.Event()
    results: list[httpx.Response] = []

    def one():
        results.append(post(served, {"messages": USER, "max_tokens": 2}))

    threads = [threading.Thread(target=one) for _ in range(6)]
    try:
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while served.service.in_flight < 6 and time.time() < deadline:
            time.sleep(0.05)
        assert served.service.in_flight == 6
        refused = post(served, {"messages": USER, "max_tokens": 2})
        assert_error(refused, 503)
        assert refused.headers["retry-after"] == "1"
    finally:
        served.backend.gate.set()
        for t in threads:
            t.join(60)
        served.backend.gate = None
    assert [r.status_code for r in results] == [200] * 6


def wait_idle(served, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if served.service.in_flight == 0 and served.backend.inner.in_flight == 0:
            return True
        time.sleep(0.05)
    return False


def test_disconnect_stops_generation(served):
    """A streaming client that leaves after the first chunk: its request is cancelled (the
    backend holds nothing for it) long before its 64 tokens would be done."""
    body = {"messages": USER, "max_tokens": 64, "temperature": 0, "stop": ["@@@"]}
    assert post(served, body).json()["usage"]["completion_tokens"] == 64  # greedy: no early EOS
    body["stream"] = True
    served.backend.gate = threading.Event()
    served.backend.delay, served.backend.cancelled = 0.1, 0  # 64 tokens would take 6.4 s
    with httpx.stream("POST", served.url + CHAT, json=body, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert '"role": "assistant"' in first
        served.backend.gate.set()
        next(line for line in lines if line.startswith("data:") and "content" in line)
    served.backend.gate = None
    left = time.time()
    assert wait_idle(served)
    assert time.time() - left < 3 and served.backend.cancelled == 1
    served.backend.delay = 0.0
    manager = served.backend.inner.manager
    assert not manager.output_router.result_handlers  # no handler left behind


def test_serves_after_everything(served):
    resp = post(served, {"messages": USER, "max_tokens": 3})
    assert resp.status_code == 200
    health = httpx.get(served.url + "/health", timeout=30).json()
    assert health["status"] == "ok" and health["in_flight"] == 0


def test_a_failing_backend_gives_500_in_shape_then_serves(served):
    """An unexpected failure: OpenAI's error shape, no traceback (whole), an error event then
    [DONE] (streamed, headers already sent); the next request is answered."""

    class Broken:
        name = "broken"
        healthy = True

        async def stream(self, ids, params):
            raise RuntimeError("boom")
            yield  # an async generator

    real = served.service.backend
    served.service.backend = Broken()
    try:
        err = assert_error(post(served, {"messages": USER, "max_tokens": 2}), 500)
        assert "boom" not in err["message"]
        with httpx.stream(
            "POST", served.url + CHAT, json={"messages": USER, "stream": True}, timeout=30
        ) as resp:
            lines = [x for x in resp.iter_lines() if x.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and '"error"' in lines[-2]
    finally:
        served.service.backend = real
    assert post(served, {"messages": USER, "max_tokens": 2}).status_code == 200


def test_disconnect_stops_a_whole_answer(served):
    """A non-streamed request whose client closes the connection: its generation is cancelled."""
    import json
    import socket

    body = json.dumps(
        {"messages": USER, "max_tokens": 64, "temperature": 0, "stop": ["@@@"]}
    ).encode()
    served.backend.delay, served.backend.cancelled = 0.1, 0  # 64 tokens would take 6.4 s
    try:
        host, port = served.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            head = (
                f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            sock.sendall(head.encode() + body)
            deadline = time.time() + 30
            while not served.backend.prompts or served.service.in_flight == 0:
                assert time.time() < deadline
                time.sleep(0.05)
        left = time.time()
        assert wait_idle(served)
        assert time.time() - left < 3 and served.backend.cancelled == 1
    finally:
        served.backend.delay = 0.0
