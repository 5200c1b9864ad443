"""Soak test: N mixed requests at concurrency C against a real `ctc-serve`, then the books are checked.

What an operator would check after a busy day, in one command: every request ended as the client
expected (0 failures), the server's Prometheus counters equal what the clients saw, the gauges are
back to 0, the same request always got the same answer, and the server's memory (RSS) stopped
growing once warm. The mix, drawn from `--seed`: chat and completions, streaming (with usage) and
not, greedy and seeded sampling, with and without speculation, and streams the client hangs up on
after a few chunks (`--disconnect-share`; these ask for 1,000 tokens with ignore_eos, so the server
cannot finish them before it sees the hang-up).

Checks, each one a line of the report and a non-zero exit if it fails:
- failures: requests that raised or ended with an unexpected finish reason;
- requests_total{stop,length,abort} equal the clients' counts of stop, length and hang-ups; error 0;
- prompt_tokens_total equals the sum of the prompts' token counts (learned from the warm-up);
- generation_tokens_total: at least the completed requests' usage plus the tokens the hung-up
  streams received (counted by their logprobs), at most that plus what the hung-up ones asked for;
- num_requests_running, num_requests_waiting and kv_cache_usage_ratio back to 0;
- consistency: each distinct request (endpoint, prompt, temperature, seed, max_tokens) got one text,
  streamed or not, speculative or not (exact on fp32, see README "lossless");
- RSS growth from the end of the warm-up to the end under `--max-rss-growth-mb` (needs the server's
  pid: known when the script starts the server, else `--pid`).

RSS and the CPU drafter: a learned drafter in bf16 on a CPU runs through oneDNN, which caches a
compiled kernel per matrix shape, up to 1,024 per cache. Drafting batches of every size meet new
shapes for thousands of requests, so RSS grows by a few hundred MB before it levels off. That is
bounded, but it hides a leak: run with LRU_CACHE_CAPACITY=16 ONEDNN_PRIMITIVE_CACHE_CAPACITY=16
(inherited by the server this starts) for a leak check (README, BENCHMARKS.md "Soak").

Usage: python -m bench.soak [--requests 1000 --concurrency 32] [--url URL --pid PID] [--help]
Without --url it starts `python -m server.cli --device cpu` on a free port (plus --server-args).
A server with an API key: set CTC_API_KEY (the server reads it too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three prime numbers.",
    "How do I boil an egg?",
    "Tell me a fact about the moon.",
    "What is 12 times 7?",
    "Give me a name for a cat.",
)
TEMPERATURES = ((0.0, None), (0.8, 1), (0.8, 2))  # (temperature, seed): greedy and seeded sampling
DISCONNECT_MAX_TOKENS = 1000  # long enough that a hung-up stream is still running when the server notices
DISCONNECT_AFTER_CHUNKS = (1, 2, 4)
STARTUP_TIMEOUT_S = 300
SETTLE_TIMEOUT_S = 30  # for the last aborts to reach the counters and the gauges to fall to 0
REQUEST_TIMEOUT_S = 600


@dataclass(frozen=True)
class Recipe:
    """One distinct request: the same recipe must always get the same text."""

    endpoint: str  # "chat" or "completions"
    prompt: str
    temperature: float
    seed: int | None
    max_tokens: int


@dataclass
class Tally:
    """What the clients saw."""

    failures: list[str] = field(default_factory=list)
    finish: Counter = field(default_factory=Counter)  # stop / length / hung-up
    prompt_tokens: int = 0
    completion_tokens: int = 0
    hung_up_tokens_seen: int = 0
    hung_up_tokens_asked: int = 0
    hung_up_prompts: Counter = field(default_factory=Counter)  # (endpoint, prompt) of hung-up streams

    @property
    def done(self) -> int:
        return sum(self.finish.values()) + len(self.failures)
    texts: dict[Recipe, set[str]] = field(default_factory=dict)
    prompt_len: dict[tuple[str, str], int] = field(default_factory=dict)


def recipes(max_tokens: int) -> list[Recipe]:
    """Each endpoint x prompt x (temperature, seed), with answer lengths up to `max_tokens` in turn: few
    enough distinct requests that each one recurs often in a run."""
    lengths = (max(1, max_tokens // 4), max(1, max_tokens // 2), max_tokens)
    combos = [(e, p, t, s) for e in ("chat", "completions") for p in PROMPTS for t, s in TEMPERATURES]
    return [Recipe(e, p, t, s, lengths[i % len(lengths)]) for i, (e, p, t, s) in enumerate(combos)]


@dataclass(frozen=True)
class Job:
    """One request of the mix: a recipe and how to send it."""

    recipe: Recipe
    stream: bool
    hang_up: bool  # a chat stream (logprobs count its tokens) dropped after a few chunks
    speculative: bool


def draw_jobs(pool: list[Recipe], n: int, rng: random.Random, disconnect_share: float) -> list[Job]:
    return [Job(rng.choice(pool), stream=rng.random() < 0.5, hang_up=rng.random() < disconnect_share,
                speculative=rng.random() < 0.75) for _ in range(n)]


async def one_request(client: openai.AsyncOpenAI, model: str, job: Job, tally: Tally) -> None:
    common = dict(model=model, temperature=job.recipe.temperature, seed=job.recipe.seed,
                  extra_body={"speculative": job.speculative})
    try:
        if job.hang_up:
            await hang_up_stream(client, job.recipe, tally, common)
        else:
            record(tally, job.recipe, *await complete(client, job.recipe, job.stream, common))
    except Exception as exc:  # noqa: BLE001 - every failure is counted and reported, none stops the soak
        tally.failures.append(f"{job}: {type(exc).__name__}: {exc}")


async def complete(client: openai.AsyncOpenAI, recipe: Recipe, stream: bool, common: dict) -> tuple:
    """(text, finish_reason, usage) of one request, streamed (with usage) or not."""
    if recipe.endpoint == "chat":
        create, prompt = client.chat.completions.create, {"messages": [{"role": "user", "content": recipe.prompt}]}
    else:
        create, prompt = client.completions.create, {"prompt": recipe.prompt}
    if not stream:
        response = await create(**prompt, max_tokens=recipe.max_tokens, **common)
        choice = response.choices[0]
        text = choice.message.content or "" if recipe.endpoint == "chat" else choice.text
        return text, choice.finish_reason, response.usage
    chunks = await create(**prompt, max_tokens=recipe.max_tokens, stream=True, stream_options={"include_usage": True},
                          **common)
    text, finish, usage = "", None, None
    async for c in chunks:
        usage = c.usage or usage
        if c.choices:
            choice = c.choices[0]
            text += (choice.delta.content or "") if recipe.endpoint == "chat" else choice.text
            finish = choice.finish_reason or finish
    return text, finish, usage


async def hang_up_stream(client: openai.AsyncOpenAI, recipe: Recipe, tally: Tally, common: dict) -> None:
    after = DISCONNECT_AFTER_CHUNKS[len(tally.hung_up_prompts) % len(DISCONNECT_AFTER_CHUNKS)]
    chunks = await client.chat.completions.create(
        messages=[{"role": "user", "content": recipe.prompt}], max_tokens=DISCONNECT_MAX_TOKENS, stream=True,
        logprobs=True, **{**common, "extra_body": {**common["extra_body"], "ignore_eos": True}})
    seen = 0
    async for c in chunks:
        if c.choices and c.choices[0].finish_reason:
            tally.failures.append(f"hang-up stream finished before the hang-up: {c.choices[0].finish_reason}")
            break
        if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content:
            seen += len(c.choices[0].logprobs.content)
            after -= 1
            if after == 0:
                break
    await chunks.close()
    tally.finish["hung-up"] += 1
    tally.hung_up_tokens_seen += seen
    tally.hung_up_tokens_asked += DISCONNECT_MAX_TOKENS
    tally.hung_up_prompts[("chat", recipe.prompt)] += 1


def record(tally: Tally, recipe: Recipe, text: str, finish: str | None, usage: object) -> None:
    if finish not in ("stop", "length") or usage is None:
        tally.failures.append(f"{recipe}: finish_reason {finish!r}, usage {usage!r}")
        return
    tally.finish[finish] += 1
    tally.prompt_tokens += usage.prompt_tokens
    tally.completion_tokens += usage.completion_tokens
    tally.prompt_len[(recipe.endpoint, recipe.prompt)] = usage.prompt_tokens
    tally.texts.setdefault(recipe, set()).add(text)


async def run_phase(base: str, model: str, jobs: list[Job], concurrency: int, tally: Tally) -> None:
    """Run `jobs` in order on `concurrency` workers, each with its own client (connection pool)."""
    pending = list(reversed(jobs))

    async def worker() -> None:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=os.environ.get("CTC_API_KEY", "none"),
                                      max_retries=0, timeout=REQUEST_TIMEOUT_S) as client:
            while pending:
                await one_request(client, model, pending.pop(), tally)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


# ------------------------------------------------------------------ server, metrics, memory


def scrape(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def start_server(server_args: list[str], log_path: Path) -> tuple[str, subprocess.Popen[bytes]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "server.cli", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
               *server_args]
    with log_path.open("wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ctc-serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return base, process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"ctc-serve not healthy after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")


def settle(base: str, before: dict[str, float], expected_finished: int) -> dict[str, float]:
    """Scrape until every request is counted and the gauges are 0 (or the settle time is up)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        after = scrape(base)
        finished = sum(delta(before, after, f"ctc_requests_total{{status={s}}}")
                       for s in ("stop", "length", "abort", "error"))
        idle = all(after[g] == 0 for g in ("ctc_num_requests_running", "ctc_num_requests_waiting",
                                           "ctc_kv_cache_usage_ratio"))
        if (finished >= expected_finished and idle) or time.monotonic() > deadline:
            return after
        time.sleep(0.2)


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


# ------------------------------------------------------------------ the books


def all_prompt_tokens(tally: Tally) -> int:
    """Completed requests' prompt tokens (their usage) plus hung-up streams' (their prompts' lengths,
    learned from completed requests with the same prompt)."""
    return tally.prompt_tokens + sum(tally.prompt_len[key] * n for key, n in tally.hung_up_prompts.items())


def evaluate(tally: Tally, server: dict[str, float], gauges: dict[str, float], rss_growth_mb: float | None,
             max_rss_growth_mb: float) -> dict[str, bool]:
    """Each check by name: does the server's account (counter deltas, gauges) match the clients'?"""
    checks = {
        "0 failures": not tally.failures,
        "requests_total{stop,length,abort} = clients' counts, error 0": (
            server["stop"] == tally.finish["stop"] and server["length"] == tally.finish["length"]
            and server["abort"] == tally.finish["hung-up"] and server["error"] == 0),
        "prompt_tokens_total = clients' prompts": server["prompt_tokens"] == all_prompt_tokens(tally),
        "generation_tokens_total within what clients saw and asked for": (
            tally.completion_tokens + tally.hung_up_tokens_seen <= server["generation_tokens"]
            <= tally.completion_tokens + tally.hung_up_tokens_asked),
        "gauges back to 0": all(v == 0 for v in gauges.values()),
        "one text per distinct request": all(len(texts) == 1 for texts in tally.texts.values()),
    }
    if rss_growth_mb is not None:
        checks[f"RSS growth after warm-up under {max_rss_growth_mb:g} MB"] = rss_growth_mb < max_rss_growth_mb
    return checks


# ------------------------------------------------------------------ the run


@dataclass
class Report:
    requests: int
    concurrency: int
    seconds: float
    client: dict
    server: dict
    rss_mb: dict
    checks: dict[str, bool]
    failures: list[str]

    @property
    def ok(self) -> bool:
        return all(self.checks.values())


def soak(base: str, pid: int | None, args: argparse.Namespace) -> Report:
    key = os.environ.get("CTC_API_KEY", "none")  # the server's key, if it has one
    model = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()["data"][0]["id"]
    rng = random.Random(args.seed)
    pool = recipes(args.max_tokens)
    tally = Tally()
    before = scrape(base)
    started = time.monotonic()
    # Warm-up: every recipe once, plainly (references for consistency, prompt lengths), then the mix.
    warmup = [Job(r, stream=False, hang_up=False, speculative=True) for r in pool]
    warmup += draw_jobs(pool, args.warmup, rng, args.disconnect_share)
    asyncio.run(run_phase(base, model, warmup, args.concurrency, tally))
    rss_warm = rss_mb(pid)
    samples: list[tuple[int, float]] = []  # (requests done in the main phase, server RSS MB)
    done_before = tally.done
    main_jobs = draw_jobs(pool, args.requests, rng, args.disconnect_share)

    async def main_phase() -> None:
        task = asyncio.ensure_future(run_phase(base, model, main_jobs, args.concurrency, tally))
        while not task.done():  # sample the server's memory while it works
            if (now := rss_mb(pid)) is not None:
                samples.append((tally.done - done_before, now))
            await asyncio.wait({task}, timeout=1.0)
        task.result()

    asyncio.run(main_phase())
    seconds = time.monotonic() - started
    total = len(warmup) + args.requests
    after = settle(base, before, total)
    rss_end = rss_mb(pid)

    server = {s: delta(before, after, f"ctc_requests_total{{status={s}}}") for s in ("stop", "length", "abort", "error")}
    server["prompt_tokens"] = delta(before, after, "ctc_prompt_tokens_total")
    server["generation_tokens"] = delta(before, after, "ctc_generation_tokens_total")
    server["drafts"] = delta(before, after, "ctc_spec_decode_num_drafts_total")
    gauges = {g: after[g] for g in ("ctc_num_requests_running", "ctc_num_requests_waiting", "ctc_kv_cache_usage_ratio")}
    growth = None if rss_warm is None or rss_end is None else rss_end - rss_warm
    checks = evaluate(tally, server, gauges, growth, args.max_rss_growth_mb)
    return Report(
        requests=total, concurrency=args.concurrency, seconds=round(seconds, 1),
        client={**dict(tally.finish), "prompt_tokens": all_prompt_tokens(tally),
                "completion_tokens": tally.completion_tokens, "hung_up_tokens_seen": tally.hung_up_tokens_seen,
                "distinct_requests": len(tally.texts),
                "inconsistent": [str(r) for r, t in tally.texts.items() if len(t) > 1][:5]},
        server={**server, **gauges},
        rss_mb={"after_warmup": rss_warm, "peak": max((m for _, m in samples), default=None), "end": rss_end,
                "growth": growth, "by_requests_done": trajectory(samples, args.requests)},
        checks=checks, failures=tally.failures[:20],
    )


def trajectory(samples: list[tuple[int, float]], total: int, points: int = 10) -> dict[int, float]:
    """RSS at each tenth of the main phase (the first sample at or past it): growth that levels off
    is the allocator warming up, growth that keeps its slope is a leak."""
    marks = {}
    for k in range(1, points + 1):
        at = next(((d, m) for d, m in samples if d >= total * k // points), None)
        if at is not None:
            marks[at[0]] = round(at[1], 1)
    return marks


def print_report(report: Report) -> None:
    print(f"soak: {report.requests} requests at concurrency {report.concurrency} in {report.seconds:g} s")
    print(f"  clients: {json.dumps(report.client)}")
    print(f"  server:  {json.dumps(report.server)}")
    print(f"  RSS MB:  {json.dumps(report.rss_mb)}")
    for name, passed in report.checks.items():
        print(f"  [{'ok' if passed else 'FAIL'}] {name}")
    for failure in report.failures:
        print(f"  failure: {failure}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests after the warm-up")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    parser.add_argument("--warmup", type=int, default=200, help="mixed requests after the one-per-recipe warm-up, "
                        "before the RSS baseline")
    parser.add_argument("--max-tokens", type=int, default=32, help="longest answer asked for (hang-ups excepted)")
    parser.add_argument("--disconnect-share", type=float, default=0.1, help="share of requests that hang up mid-stream")
    parser.add_argument("--max-rss-growth-mb", type=float, default=64.0, help="bound on RSS growth after warm-up")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument("--url", help="soak this running server instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, for the RSS check")
    parser.add_argument("--server-args", default="", help="extra ctc-serve flags for the server this starts")
    parser.add_argument("--out", type=Path, help="write the report as JSON here too")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    process = None
    log_path = Path(tempfile.mkstemp(prefix="soak-server-", suffix=".log")[1])
    try:
        if args.url:
            base, pid = args.url.rstrip("/"), args.pid
        else:
            base, process = start_server(shlex.split(args.server_args), log_path)
            pid = process.pid
        report = soak(base, pid, args)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    if process is not None and "Traceback" in log_path.read_text():
        report.checks["no traceback in the server log"] = False
        report.failures.append(f"traceback in {log_path}")
    print_report(report)
    if args.out:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        args.out.write_text(json.dumps({"date": stamp, "argv": argv or sys.argv[1:], **asdict(report),
                                        "ok": report.ok}, indent=2, default=str))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
