#!/usr/bin/python3
"""bench/teacher_peer.py - the Python peers of bench_teacher (not a test).

  teacher_peer.py cache DIR [N_INSERT] [N_LOOKUP]
      python3-diskcache doing what bench_teacher cache does: durable inserts
      (SQLite synchronous=FULL, as kdkit's cache) of the same ~3 KB bodies,
      then hit lookups of random keys (p50/p99 per call, lookups/s).
  teacher_peer.py client PORT [N] [IN_FLIGHT]
      python3-aiohttp: N chat requests, IN_FLIGHT at once (one session, a
      connection pool of IN_FLIGHT), max_tokens 1 with logprobs, every
      answer parsed as JSON.

Prints one "key value" line per figure, like bench_teacher.
"""
import asyncio
import hashlib
import os
import random
import shutil
import sys
import time


def bench_cache(d, n_ins, n_look):
    import diskcache

    path = os.path.join(d, "bench_diskcache")
    shutil.rmtree(path, ignore_errors=True)
    # sqlite_synchronous=2 is FULL: the same durability as kdkit's cache.
    cache = diskcache.Cache(path, sqlite_synchronous=2)
    body = '{"id":"x","choices":[{"message":{"content":"'
    while len(body) < 3000:
        body += "token %d " % len(body)
    body += '"}}]}'
    keys = [hashlib.sha256(("bench-%d" % i).encode()).hexdigest() for i in range(n_ins)]
    t0 = time.perf_counter()
    for i, k in enumerate(keys):
        cache.set(k, {"body": body, "prompt_tokens": 20, "completion_tokens": 16,
                      "cost": 1e-5, "sample_index": i})
    ins = n_ins / (time.perf_counter() - t0)
    rnd = random.Random(1)
    lat = []
    t1 = time.perf_counter()
    for _ in range(n_look):
        k = keys[rnd.randrange(n_ins)]
        a = time.perf_counter_ns()
        v = cache.get(k)
        lat.append(time.perf_counter_ns() - a)
        if v is None:
            sys.exit("lookup missed")
    total = time.perf_counter() - t1
    lat.sort()
    print("diskcache_durable_inserts_per_s %.0f" % ins)
    print("diskcache_hit_p50_us %.2f" % (lat[len(lat) // 2] / 1000))
    print("diskcache_hit_p99_us %.2f" % (lat[len(lat) * 99 // 100] / 1000))
    print("diskcache_hits_per_s %.0f" % (n_look / total))
    cache.close()


async def client(port, n, inflight):
    import aiohttp

    url = "http://127.0.0.1:%d/v1/chat/completions" % port
    salt = time.time_ns()
    sem = asyncio.Semaphore(inflight)
    ok = 0
    conn = aiohttp.TCPConnector(limit=inflight)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def one(i):
            nonlocal ok
            body = {"model": "kdkit-toy", "max_tokens": 1, "logprobs": True, "top_logprobs": 5,
                    "messages": [{"role": "user", "content": "benchmark prompt %d-%d" % (salt, i)}]}
            async with sem:
                async with s.post(url, json=body) as r:
                    j = await r.json()
                    if r.status == 200 and j["choices"][0]["message"]["content"] is not None:
                        ok += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        el = time.perf_counter() - t0
    print("aiohttp_client_requests_per_s %.0f" % (ok / el))
    print("aiohttp_client_ok %d of %d" % (ok, n))


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "cache":
        bench_cache(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2000,
                    int(sys.argv[4]) if len(sys.argv) > 4 else 200000)
    elif len(sys.argv) >= 3 and sys.argv[1] == "client":
        asyncio.run(client(int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 5000,
                           int(sys.argv[4]) if len(sys.argv) > 4 else 64))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
