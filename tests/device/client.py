"""Load for the device check: N streaming requests at concurrency C, then a summary."""

import http.client
import json
import sys
import threading
import time

port, n, conc = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
done = []
lock = threading.Lock()


def worker(k):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    i = k
    while i < n:
        max_tokens = 16 + 24 * (i % 5)
        prompt = " ".join(["energy"] * (64 * (1 + i % 7)))
        body = json.dumps({"model": "torch-matmul", "prompt": prompt, "max_tokens": max_tokens,
                           "stream": True, "stream_options": {"include_usage": True}})
        t0 = time.time()
        c.request("POST", "/v1/completions", body, {"Content-Type": "application/json",
                                                     "X-Request-Id": f"dev-{i}"})
        r = c.getresponse()
        data = r.read()
        with lock:
            done.append((i, r.status, time.time() - t0, data.count(b"data: ")))
        i += conc


threads = [threading.Thread(target=worker, args=(k,)) for k in range(conc)]
t0 = time.time()
for t in threads:
    t.start()
for t in threads:
    t.join()
ok = sum(1 for d in done if d[1] == 200)
print(f"client: {ok}/{n} ok in {time.time() - t0:.1f}s")
