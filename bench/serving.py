"""Online serving: Poisson arrivals against a running `splitfuse serve` (or any OpenAI server).

    splitfuse serve --port 23333 &
    python bench/serving.py --url http://127.0.0.1:23333 --request-rate 16 --num-prompts 500

Requests are synthetic with ShareGPT-like lengths (log-normal, mean about 202 input and 179 output
tokens; seeded, nothing downloaded), sent as token-id prompts to /v1/completions with streaming
and ignore_eos so every request produces exactly its output length. Reports TTFT, inter-token
latency, TPOT and end-to-end latency (p50/p90/p99) and throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

# The repository root replaces this script's folder, whose `kernels.py` would shadow the
# `kernels` package that transformers imports.
sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.argtypes import non_negative_float, positive_int


@dataclass
class Record:
    input_len: int
    output_len: int
    ok: bool = False
    sent: float = 0.0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    tokens: int = 0


def sharegpt_like(num: int, seed: int, max_len: int) -> list[tuple[int, int]]:
    """Log-normal lengths fitted to ShareGPT's means (about 202 in / 179 out)."""
    rng = random.Random(seed)

    def draw(mean: float, sigma: float) -> int:
        mu = math.log(mean) - sigma**2 / 2
        return max(4, min(max_len, int(rng.lognormvariate(mu, sigma))))

    return [(draw(202, 0.9), draw(179, 0.8)) for _ in range(num)]


async def one(
    session: aiohttp.ClientSession, url: str, model: str, prompt: list[int], record: Record
) -> None:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": record.output_len,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0.0,
    }
    start = time.perf_counter()
    record.sent = start
    last = start
    try:
        async with session.post(url + "/v1/completions", json=body) as response:
            if response.status != 200:
                return
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                chunk = json.loads(line[5:])
                if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if record.tokens == 0:
                    record.ttft = now - start
                else:
                    record.itls.append(now - last)
                last = now
                record.tokens += 1
        record.e2e = time.perf_counter() - start
        record.ok = True
    except aiohttp.ClientError:
        record.ok = False


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def run(args: argparse.Namespace) -> dict:
    lengths = sharegpt_like(args.num_prompts, args.seed, args.max_len)
    rng = random.Random(args.seed + 1)
    records = [Record(i, o) for i, o in lengths]
    prompts = [[rng.randrange(1000, 30000) for _ in range(i)] for i, _ in lengths]
    timeout = aiohttp.ClientTimeout(total=None)
    connector = aiohttp.TCPConnector(limit=0)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with aiohttp.ClientSession(
        timeout=timeout, connector=connector, headers=headers
    ) as session:
        async with session.get(args.url + "/v1/models") as response:
            model = (await response.json())["data"][0]["id"]
        tasks = []
        start = time.perf_counter()
        for prompt, record in zip(prompts, records, strict=True):
            tasks.append(asyncio.create_task(one(session, args.url, model, prompt, record)))
            if args.request_rate > 0:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    done = [r for r in records if r.ok]
    ttft = [r.ttft for r in done]
    itl = [x for r in done for x in r.itls]
    # ignore_eos: each request produces exactly output_len tokens, however they were chunked.
    tpot = [(r.e2e - r.ttft) / (r.output_len - 1) for r in done if r.output_len > 1]
    e2e = [r.e2e for r in done]
    out_tokens = sum(r.output_len for r in done)
    return {
        "request_rate": args.request_rate,
        "num_prompts": args.num_prompts,
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "output_tok_s": out_tokens / duration,
        "total_tok_s": (out_tokens + sum(r.input_len for r in done)) / duration,
        "mean_input_len": statistics.mean(r.input_len for r in records),
        "mean_output_len": statistics.mean(r.output_len for r in records),
        # Each request: seconds from the run's start to its send, its TTFT and end-to-end (ms).
        "requests": [
            {
                "sent_s": r.sent - start,
                "input_len": r.input_len,
                "output_len": r.output_len,
                "ok": r.ok,
                "ttft_ms": r.ttft * 1e3,
                "e2e_ms": r.e2e * 1e3,
            }
            for r in records
        ],
        **{
            f"{name}_{stat}_ms": value * 1e3
            for name, values in (("ttft", ttft), ("itl", itl), ("tpot", tpot), ("e2e", e2e))
            for stat, value in (
                ("mean", statistics.mean(values) if values else float("nan")),
                ("p50", pct(values, 50)),
                ("p90", pct(values, 90)),
                ("p99", pct(values, 99)),
            )
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:23333")
    parser.add_argument("--api-key", default=None)
    parser.add_argument(
        "--request-rate", type=non_negative_float, default=16.0, help="requests/s; 0: all"
    )
    parser.add_argument("--num-prompts", type=positive_int, default=500)
    parser.add_argument("--max-len", type=positive_int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(
        f"\nrate {args.request_rate}/s, {result['completed']} ok / {result['failed']} failed, "
        f"{result['duration_s']:.1f} s, {result['request_throughput']:.2f} req/s, "
        f"{result['output_tok_s']:.0f} output tok/s"
    )
    print(f"{'ms':<6} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}")
    for name in ("ttft", "itl", "tpot", "e2e"):
        print(
            f"{name:<6} "
            + " ".join(f"{result[f'{name}_{s}_ms']:>9.1f}" for s in ("mean", "p50", "p90", "p99"))
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
