#!/usr/bin/env python3
"""Load generator of scripts/bench-engine.sh (not a test): streamed OpenAI chat completions
against several targets (llama-server, our worker's native route, our apiserver), rounds
alternating the targets closely (A, B, C, A, B, C, ...), and a Markdown table of medians with
ratios to the first target.

Scenarios (--scenario, repeatable):
  single      one stream: decode tokens/s (tokens after the first / time after the first)
  concN       N concurrent streams, distinct prompts: aggregate tokens/s, TTFT p50
  prefixN     N concurrent streams sharing a ~600-token system prompt (fresh questions each
              round, the prefix cache warm on both): aggregate tokens/s, TTFT p50
  short       one short request ("Hi", 1 token), 5 times a round: TTFT median

Every request is bounded (--timeout seconds); a failed request fails the run.
"""
import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

SYSTEM = (
    "You are a meticulous assistant for a database team. You answer questions about SQL, "
    "schemas, indexes, query plans, transactions, replication and backups. Be precise, "
    "prefer short answers, give an example when it helps, and say so when you are unsure. "
) * 9  # ~600 tokens with the chat template

TOPICS = [
    "the history of Europe", "the ocean", "mountains", "a small village", "the moon",
    "a long journey", "the first computers", "a city at night", "a forest in winter",
    "an old library", "a river", "the desert", "a lighthouse", "a train ride", "the stars",
    "a garden",
]


def one(url, model, messages, max_tokens, timeout):
    """One streamed chat completion: (ttft s, completion tokens, first->last s, total s)."""
    u = urllib.parse.urlparse(url)
    body = json.dumps({
        "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    })
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    t0 = time.perf_counter()
    conn.request("POST", u.path.rstrip("/") + "/chat/completions", body,
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{url}: HTTP {resp.status}: {resp.read()[:300]!r}")
    first = last = None
    chunks = 0
    usage = None
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        ev = json.loads(data)
        if ev.get("usage"):
            usage = ev["usage"]
        for ch in ev.get("choices") or []:
            if (ch.get("delta") or {}).get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
    total = time.perf_counter() - t0
    conn.close()
    if first is None:
        raise RuntimeError(f"{url}: no content streamed")
    tokens = (usage or {}).get("completion_tokens") or chunks
    return first - t0, tokens, last - first, total


def story(i, rnd):
    return [{"role": "user", "content":
             f"Write a long, detailed story about {TOPICS[(i + rnd) % len(TOPICS)]}."}]


def with_prefix(i, rnd):
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Question {rnd}-{i}: explain what an index on "
             f"column c{i} of table t{rnd} is for, and write a long example."}]


def burst(url, model, n, messages_of, max_tokens, timeout):
    """n concurrent streams; (aggregate tok/s, ttft p50 ms, per-stream results)."""
    results = [None] * n
    errors = []

    def run(i):
        try:
            results[i] = one(url, model, messages_of(i), max_tokens, timeout)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    tokens = sum(r[1] for r in results)
    return tokens / wall, statistics.median(r[0] for r in results) * 1e3, results


def scenario(name, url, model, rnd, max_tokens, timeout):
    """Metrics of one round of scenario `name` on one target: {metric: value}."""
    if name == "single":
        ttft, tokens, span, _ = one(url, model, story(0, rnd), max_tokens, timeout)
        return {"decode tok/s": (tokens - 1) / span if span > 0 else 0.0, "TTFT ms": ttft * 1e3}
    if name == "short":
        ttfts = [one(url, model, [{"role": "user", "content": "Hi"}], 1, timeout)[0] * 1e3
                 for _ in range(5)]
        return {"TTFT ms": statistics.median(ttfts)}
    for prefix, msgs in (("conc", story), ("prefix", with_prefix)):
        if name.startswith(prefix):
            n = int(name[len(prefix):])
            agg, ttft, _ = burst(url, model, n, lambda i: msgs(i, rnd), max_tokens, timeout)
            return {"aggregate tok/s": agg, "TTFT p50 ms": ttft}
    raise SystemExit(f"unknown scenario {name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", action="append", required=True,
                    help="label=base URL (…/v1); the first is the reference of the ratios")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--scenario", action="append", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--slots", type=int, default=4, help="the engines' slot count (warm-up)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--header", action="store_true", help="print the table header")
    ap.add_argument("--ref2", help="label of a second reference target (another ratio column)")
    a = ap.parse_args()
    targets = [t.split("=", 1) for t in a.target]
    # Warm up: load pages, and put the shared system prompt in every slot (as many
    # concurrent requests as slots), so the prefix scenario measures a warm cache on both
    # engines rather than which slot happens to hold it.
    for label, url in targets:
        burst(url, a.model, a.slots, lambda i: with_prefix(i, -1), 4, a.timeout)
    if a.header:
        extra = f" ratio to {a.ref2} |" if a.ref2 else ""
        print("| scenario | metric | target | median | rounds | ratio to " + targets[0][0] + " |" + extra)
        print("|---|---|---|---:|---|---:|" + ("---:|" if a.ref2 else ""))
    for sc in a.scenario:
        got = {label: [] for label, _ in targets}
        for rnd in range(a.rounds):
            order = targets if rnd % 2 == 0 else targets[::-1]
            for label, url in order:
                got[label].append(scenario(sc, url, a.model, rnd, a.max_tokens, a.timeout))
        def medians(label):
            return {m: statistics.median(r[m] for r in got[label]) for m in got[label][0]}
        ref = medians(targets[0][0])
        ref2 = medians(a.ref2) if a.ref2 else None
        for label, _ in targets:
            for metric, med in medians(label).items():
                vals = [r[metric] for r in got[label]]
                ratio = med / ref[metric] if ref[metric] else float("nan")
                extra = ""
                if ref2 is not None:
                    extra = f" {med / ref2[metric]:.2f}x |" if ref2[metric] else " |"
                print(f"| {sc} | {metric} | {label} | {med:.1f} | "
                      f"{' '.join(f'{v:.1f}' for v in vals)} | {ratio:.2f}x |{extra}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
