"""`inference/serve.py` as a user runs it (a subprocess on 127.0.0.1): a bounded load test
(200 requests, 16 at a time, streamed and not, a quarter of the streams dropped mid-answer) and
SIGTERM letting the answers in flight finish before the process exits."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

SERVE = os.path.join(os.path.dirname(__file__), "..", "..", "inference", "serve.py")


def start_server(model_dir, port: int, *flags: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, SERVE, "--model", str(model_dir), "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve.py exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("serve.py did not answer /health in 120 s")


def check_whole(body: dict) -> None:
    choice = body["choices"][0]
    assert body["object"] == "chat.completion"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    use = body["usage"]
    assert use["total_tokens"] == use["prompt_tokens"] + use["completion_tokens"]
    assert 0 <= use["completion_tokens"] <= 16


def check_stream(lines: list[str]) -> None:
    data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert [f for f in finals if f] in (["stop"], ["length"])
    assert finals[-1] is not None  # the finish_reason chunk is the last choice chunk


async def one_request(client: httpx.AsyncClient, i: int, stats: dict) -> None:
    body = {
        "messages": [{"role": "user", "content": f"question number {i}"}],
        "max_tokens": 16,
        "temperature": 0.8,
        "stop": ["@@@"],
    }
    if i % 2 == 0:
        resp = await client.post("/v1/chat/completions", json=body)
        stats[resp.status_code] = stats.get(resp.status_code, 0) + 1
        if resp.status_code == 200:
            check_whole(resp.json())
        return
    body["stream"] = True
    drop = i % 4 == 1  # a quarter of all clients leave mid-stream
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        stats[resp.status_code] = stats.get(resp.status_code, 0) + 1
        lines = []
        async for line in resp.aiter_lines():
            lines.append(line)
            if drop and len([x for x in lines if x.startswith("data: ")]) == 2:
                stats["dropped"] = stats.get("dropped", 0) + 1
                return  # closes the connection mid-answer
        if resp.status_code == 200:
            check_stream(lines)


async def load(url: str, n: int, concurrency: int) -> dict:
    stats: dict = {}
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def guarded(i):
            async with sem:
                await one_request(client, i, stats)

        await asyncio.gather(*(guarded(i) for i in range(n)))
    return stats


def test_load_200_requests(tiny_chat_dir, free_port):
    port = free_port
    proc = start_server(tiny_chat_dir, port, "--max-queue", "64", "--max-tokens", "16")
    url = f"http://127.0.0.1:{port}"
    try:
        rss = psutil.Process(proc.pid)
        asyncio.run(load(url, 32, 16))  # warm-up: allocator pools, KV blocks, tokenizer caches
        time.sleep(1)
        start = rss.memory_info().rss
        stats = asyncio.run(load(url, 200, 16))
        assert 500 not in stats and set(stats) <= {200, "dropped"}, stats
        assert stats[200] == 200 and stats["dropped"] == 50
        time.sleep(1)
        after = rss.memory_info().rss
        assert after <= start * 1.10, (start, after)
        health = httpx.get(url + "/health", timeout=10).json()
        assert health["in_flight"] == 0
        again = httpx.post(
            url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4},
            timeout=60,
        )
        check_whole(again.json())
    finally:
        proc.kill()
        proc.wait(30)


def test_sigterm_finishes_requests_in_flight(tiny_chat_dir, free_port):
    port = free_port
    proc = start_server(tiny_chat_dir, port)
    url = f"http://127.0.0.1:{port}"
    results: list[list[str]] = []
    started = threading.Barrier(4)
    ended: list[float] = []

    def stream():
        body = {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 200,
            "temperature": 0,
            "stream": True,
        }
        lines = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if not lines:
                    started.wait(30)
                lines.append(line)
        ended.append(time.time())
        results.append(lines)

    threads = [threading.Thread(target=stream) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        started.wait(60)  # every stream has its first event: all three are in flight
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert len(results) == 3
        for lines in results:
            check_stream_any(lines)  # each answer ran to its end, then [DONE]
        assert min(ended) > sent  # they were still streaming when the signal came
        # uvicorn re-raises the signal once it has shut down, so the exit status says SIGTERM.
        assert proc.wait(15) in (0, -signal.SIGTERM)
        assert time.time() - sent <= 12
        assert "Traceback" not in proc.stderr.read()
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def check_stream_any(lines: list[str]) -> None:
    data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]", data[-3:]
    finals = [json.loads(d)["choices"][0]["finish_reason"] for d in data[:-1]]
    assert finals[-1] in ("stop", "length")
