"""Serving throughput and latency: inference/serve.py against `transformers serve
--continuous-batching`, same model (the embedded SmolLM2-135M-Instruct), same dtype, same load.

Run:
    python benchmarks/bench_serve.py                         # 3 repeats, 1 and 8 clients
    python benchmarks/bench_serve.py --repeats 1 --requests 1 --max-tokens 16   # a quick look
    python benchmarks/bench_serve.py --only ours             # skip the peer
    python benchmarks/bench_serve.py --backend llama.cpp     # ours on llama.cpp (the GGUF)
    python benchmarks/bench_serve.py --dtype bfloat16        # both in bf16 (default: both fp32)
    python benchmarks/bench_serve.py --dtype auto            # each server's own default dtype

Each repeat runs both servers one after the other (order alternating between repeats), each
started fresh, warmed up with one request, then loaded by C concurrent streaming clients that each
send R chat requests (distinct prompts, greedy, max_tokens T). Per server and C: aggregate
tokens/s (generated tokens of all clients / wall time) and time to first token (p50, p95 over
requests), median and spread (min..max) over the repeats. Ours also reports time to first token
at turn 1 and turn 10 of one conversation (prefix KV reuse). Figures need a quiet machine.

The end of the output sets each figure against issue 28's goals (ratios are taken within a
repeat, then the median over repeats): ours at the most clients >= 3x ours at one client;
p95 time to first token there <= 2 s; against the peer there, tokens/s >= 1.2x and p50 time
to first token <= 1.0x; turn 10's time to first token <= 1.3x turn 1's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TOPICS = "the moon,volcanoes,bread,bees,chess,rivers,glass,clocks,owls,tea,maps,snow".split(",")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, model: str, port: int, dtype: str, backend: str) -> subprocess.Popen:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if kind == "ours":
        cmd = [sys.executable, str(REPO / "inference" / "serve.py"), "--port", str(port)]
        cmd += ["--backend", backend]
        if backend == "torch":
            cmd += ["--model", model, "--dtype", dtype]
    else:
        cmd = [str(Path(sys.executable).parent / "transformers"), "serve", model]
        cmd += ["--continuous-batching", "--port", str(port), "--host", "127.0.0.1"]
        cmd += ["--dtype", dtype, "--device", "cpu"]
        # The same KV budget as ours (TorchBackend: 32-token blocks, 8192 tokens + one block,
        # 256 tokens per step); left alone it sizes its cache from free memory (13 GB here).
        cmd += ["--cb-block-size", "32", "--cb-num-blocks", "257", "--cb-max-batch-tokens", "256"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} exited: {proc.stderr.read().decode()[-1500:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{kind} did not start")


async def one(client, model, messages, max_tokens, text=None) -> tuple[float, int]:
    """(time to first token in s, generated tokens) of one streamed request; the answer's
    pieces are appended to `text` when given."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    if model:
        body["model"] = model
    t0, first, pieces, used = time.perf_counter(), None, 0, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    first = first or time.perf_counter() - t0
                    pieces += 1
                    if text is not None:
                        text.append(choice["delta"]["content"])
    return (first or time.perf_counter() - t0), (used if used is not None else pieces)


async def load(url, model, clients, requests, max_tokens) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await one(client, model, [{"role": "user", "content": "Hi"}], 4)  # warm-up

        async def user(c):
            out = []
            for r in range(requests):
                topic = TOPICS[(c * requests + r) % len(TOPICS)]
                msg = [{"role": "user", "content": f"Client {c}: tell me about {topic}."}]
                out.append(await one(client, model, msg, max_tokens))
            return out

        t0 = time.perf_counter()
        results = [x for xs in await asyncio.gather(*(user(c) for c in range(clients))) for x in xs]
        wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    return {
        "tokens_per_s": sum(r[1] for r in results) / wall,
        "ttft_p50": ttft[len(ttft) // 2],
        "ttft_p95": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))],
    }


async def turns(url, model, n=10) -> tuple[float, float]:
    """TTFT of turn 1 and turn n of one conversation (answers fed back as history)."""
    messages, ttfts = [], []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for i in range(n):
            messages.append({"role": "user", "content": f"Tell me one fact about {TOPICS[i]}."})
            text: list[str] = []
            ttft, _ = await one(client, model, messages, 24, text)
            messages.append({"role": "assistant", "content": "".join(text)})
            ttfts.append(ttft)
    return ttfts[0], ttfts[-1]


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}..{max(values):.2f})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--only", choices=["ours", "peer"], default=None)
    p.add_argument(
        "--backend",
        choices=["torch", "llama.cpp"],
        default="torch",
        help="ours: torch on the embedded model's folder (the goals' setting), or llama.cpp on "
        "the embedded model as serve.py loads it",
    )
    args = p.parse_args()
    from openchatkit.models.embedded import ensure_embedded_model

    model = str(ensure_embedded_model())
    kinds = [args.only] if args.only else ["ours", "peer"]
    table: dict = {}
    for rep in range(args.repeats):
        order = kinds if rep % 2 == 0 else kinds[::-1]
        for kind in order:
            port = free_port()
            proc = start(kind, model, port, args.dtype, args.backend)
            url = f"http://127.0.0.1:{port}"
            name = None if kind == "ours" else model
            try:
                for c in args.clients:
                    r = asyncio.run(load(url, name, c, args.requests, args.max_tokens))
                    print(f"repeat {rep} {kind} {c} clients: {r}", flush=True)
                    for key, value in r.items():
                        table.setdefault((kind, c, key), []).append(value)
                if kind == "ours":
                    t1, t10 = asyncio.run(turns(url, name))
                    print(f"repeat {rep} ours TTFT turn 1 {t1:.3f} s, turn 10 {t10:.3f} s")
                    table.setdefault(("ours", "turns", "t10/t1"), []).append(t10 / t1)
            finally:
                proc.terminate()
                proc.wait(60)
    print("\nmedian (min..max) over", args.repeats, "repeats")
    for key, values in sorted(table.items(), key=str):
        print(" ".join(map(str, key)), summary(values))
    print(f"\ngoals (issue 28; ours = {args.backend} backend)")
    for line in goal_lines(table, min(args.clients), max(args.clients)):
        print(line)
    return 0


def goal_lines(table: dict, one: int, many: int) -> list[str]:
    """Each goal: the median of its per-repeat ratio (or value), the goal, met or not."""

    def ratios(a, b):
        xs, ys = table.get(a, []), table.get(b, [])
        return [x / y for x, y in zip(xs, ys, strict=False) if y]

    rows = [
        (f"ours {many} clients / 1 client, tokens/s", ratios(("ours", many, "tokens_per_s"),
         ("ours", one, "tokens_per_s")), ">=", 3.0),
        (f"ours p95 TTFT at {many} clients (s)", table.get(("ours", many, "ttft_p95"), []),
         "<=", 2.0),
        (f"ours / peer tokens/s at {many} clients", ratios(("ours", many, "tokens_per_s"),
         ("peer", many, "tokens_per_s")), ">=", 1.2),
        (f"ours / peer p50 TTFT at {many} clients", ratios(("ours", many, "ttft_p50"),
         ("peer", many, "ttft_p50")), "<=", 1.0),
        ("ours TTFT turn 10 / turn 1", table.get(("ours", "turns", "t10/t1"), []), "<=", 1.3),
    ]  # fmt: skip
    out = []
    for name, values, op, goal in rows:
        if not values:
            out.append(f"  {name}: not measured (goal {op} {goal})")
            continue
        value = statistics.median(values)
        met = value >= goal if op == ">=" else value <= goal
        spread = f"{min(values):.2f}..{max(values):.2f}"
        out.append(
            f"  {name}: {value:.2f} ({spread}), goal {op} {goal}: {'met' if met else 'NOT met'}"
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
