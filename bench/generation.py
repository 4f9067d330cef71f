#!/usr/bin/env python3
"""Text-generation figures for one OpenAI-compatible server (Kiln or llama.cpp's llama-server),
measured the same way for both: POST /v1/completions, greedy, the same prompt.

  generation.py URL NAME > figures.json
  generation.py median NAME ROUND.json... > figures.json   (the median of each figure over rounds)

- time to first token: a streamed request, from sending to the first chunk with text;
- single-stream decode tokens/s: (completion tokens - 1) / (total time - time to first token);
- aggregate tokens/s at 1, 4 and 8 concurrent streams: each client sends requests back to back
  for the measurement window; completion tokens over wall time;
- prefill tokens/s at 128 and 512 prompt tokens: a prompt of that many tokens (as the server
  counts them in `usage`) and max_tokens 1, prompt tokens over the request's time, median of 5.
  Each request starts with a different number, so no server can reuse a cached prefix.
Completion tokens come from each response's `usage`, so both servers are counted alike.
"""
import http.client
import json
import os
import sys
import threading
import time
import urllib.parse

PROMPT = "1, 2, 3, 4, 5,"
MAX_TOKENS = 128
CONCURRENCY = [1, 4, 8]
PREFILL_TOKENS = [128, 512]
WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing in old green "
         "trees near the quiet river and children play").split()
WINDOW_S = float(os.environ.get("WINDOW_S", "10"))


def request(url, body, stream=False):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    payload = dict(body, stream=stream)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(payload), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"{url}: HTTP {resp.status}: {resp.read()[:300]!r}")
    if not stream:
        out = json.loads(resp.read())
        conn.close()
        return out, time.perf_counter() - t0, None
    first = None
    for line in resp:
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        choices = chunk.get("choices") or [{}]
        if first is None and choices[0].get("text"):
            first = time.perf_counter() - t0
    conn.close()
    return None, time.perf_counter() - t0, first


def median_of_rounds(name, paths):
    rounds = [json.load(open(p)) for p in paths]

    def med(values):
        values = sorted(v for v in values if v is not None)
        return values[len(values) // 2] if values else None

    first = rounds[0]
    return {
        "server": name,
        "prompt": first["prompt"],
        "max_tokens": first["max_tokens"],
        "rounds": len(rounds),
        "ttft_ms": med(r.get("ttft_ms") for r in rounds),
        "single_stream_tokens_per_s": med(r.get("single_stream_tokens_per_s") for r in rounds),
        "aggregate_tokens_per_s": {
            c: med(r["aggregate_tokens_per_s"].get(c) for r in rounds) for c in first["aggregate_tokens_per_s"]
        },
        "prefill_tokens_per_s": {
            n: med((r.get("prefill_tokens_per_s") or {}).get(n) for r in rounds)
            for n in first.get("prefill_tokens_per_s") or {}
        },
        "per_round": rounds,
    }


def words_prompt(first, count):
    """A two-digit number `first`, then `count` words."""
    return f"{first} " + " ".join(WORDS[i % len(WORDS)] for i in range(count))


def prefill_prompt(url, target):
    """Words whose prompt, as `url`'s server counts it in usage, is `target` tokens long."""
    count = target
    for _ in range(8):
        text = words_prompt(10, count)
        out, _, _ = request(url, {"prompt": text, "max_tokens": 1, "temperature": 0, "cache_prompt": False})
        got = out["usage"]["prompt_tokens"]
        if got == target:
            return count
        count += target - got
    raise SystemExit(f"{url}: no prompt of {target} tokens found (last: {got})")


def prefill_rate(url, target):
    count = prefill_prompt(url, target)
    rates = []
    for i in range(5):
        # A different first number each time (two digits, the same token count): no prefix reuse.
        text = words_prompt(11 + i, count)
        out, total, _ = request(url, {"prompt": text, "max_tokens": 1, "temperature": 0, "cache_prompt": False})
        rates.append(out["usage"]["prompt_tokens"] / total)
    return round(sorted(rates)[len(rates) // 2], 1)


def main():
    if sys.argv[1] == "median":
        print(json.dumps(median_of_rounds(sys.argv[2], sys.argv[3:])))
        return
    url, name = sys.argv[1], sys.argv[2]
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "cache_prompt": False}
    request(url, body)  # warm
    ttfts, rates = [], []
    for _ in range(3):
        _, _, ttft = request(url, body, stream=True)
        out, total, _ = request(url, body)
        tokens = out["usage"]["completion_tokens"]
        ttfts.append(ttft)
        rates.append((tokens - 1) / max(total - ttft, 1e-9))
    figures = {
        "server": name,
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "ttft_ms": round(sorted(ttfts)[1] * 1000, 1),
        "single_stream_tokens_per_s": round(sorted(rates)[1], 1),
        "aggregate_tokens_per_s": {},
        "prefill_tokens_per_s": {},
    }
    for n in PREFILL_TOKENS:
        figures["prefill_tokens_per_s"][str(n)] = prefill_rate(url, n)
        print(f"{name}: prefill of {n} tokens: {figures['prefill_tokens_per_s'][str(n)]} tokens/s", file=sys.stderr)
    for clients in CONCURRENCY:
        counts = [0] * clients
        stop = time.perf_counter() + WINDOW_S
        errors = []

        def client(i):
            try:
                while time.perf_counter() < stop:
                    out, _, _ = request(url, body)
                    counts[i] += out["usage"]["completion_tokens"]
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise SystemExit(f"{name}: {errors[0]}")
        figures["aggregate_tokens_per_s"][str(clients)] = round(sum(counts) / (time.perf_counter() - t0), 1)
        print(f"{name}: {clients} streams: {figures['aggregate_tokens_per_s'][str(clients)]} tokens/s", file=sys.stderr)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
