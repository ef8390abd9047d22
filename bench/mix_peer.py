#!/usr/bin/python3
"""bench/mix_peer.py - the Python peer of `kdkit mix` (not a test).

  mix_peer.py PORT PROMPTS OUT IN_FLIGHT MAX_TOKENS TOP_LOGPROBS FSYNC_EVERY

An asyncio + aiohttp KD generator doing the work kdkit mix does per sample:
read a JSONL prompt, POST /v1/chat/completions with logprobs, parse the JSON
answer, write one JSONL row (index, id, prompt, completion, logprobs, usage)
and make it durable (os.fsync after every FSYNC_EVERY rows; a row counts as
done only after its fsync).  IN_FLIGHT requests at once over one session.
Prints "key value" lines.
"""
import asyncio
import json
import os
import sys
import time


async def main(port, prompts, out, inflight, max_tokens, top, every):
    import aiohttp

    with open(prompts) as f:
        items = [json.loads(l) for l in f]
    url = "http://127.0.0.1:%d/v1/chat/completions" % port
    q = asyncio.Queue()
    for i, it in enumerate(items):
        q.put_nowait((i, it))
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    pending = [0]
    done = [0]

    async def worker(session):
        while True:
            try:
                i, it = q.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = {"model": "kdkit-toy",
                    "messages": [{"role": "user", "content": it["prompt"]}],
                    "max_tokens": max_tokens, "temperature": 1.0, "top_p": 1.0,
                    "logprobs": True, "top_logprobs": top}
            for attempt in range(8):
                try:
                    async with session.post(url, json=body) as r:
                        if r.status != 200:
                            await asyncio.sleep(0.01 * (attempt + 1))
                            continue
                        a = await r.json()
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.01 * (attempt + 1))
            c = a["choices"][0]
            row = {"index": i, "id": it.get("id"), "status": "ok", "prompt_text": it["prompt"],
                   "completion": c["message"]["content"], "finish_reason": c["finish_reason"],
                   "logprobs": c["logprobs"]["content"], "usage": a.get("usage")}
            os.write(fd, (json.dumps(row, separators=(",", ":")) + "\n").encode())
            pending[0] += 1
            if pending[0] >= every:
                os.fsync(fd)
                done[0] += pending[0]
                pending[0] = 0

    conn = aiohttp.TCPConnector(limit=inflight)
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=conn) as s:
        await asyncio.gather(*[worker(s) for _ in range(inflight)])
    os.fsync(fd)
    os.close(fd)
    dt = time.perf_counter() - t0
    print("python_aiohttp_fsync%d_samples_per_s %.0f" % (every, len(items) / dt))


if __name__ == "__main__":
    a = sys.argv
    asyncio.run(main(int(a[1]), a[2], a[3], int(a[4]), int(a[5]), int(a[6]), int(a[7])))
