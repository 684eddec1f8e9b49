"""Load for the physical reference: two request classes at fixed rates, in timed periods.

    python3 load.py periods --port-a P --port-b P --label main --out F [--reps 3]
    python3 load.py seq --port P --label seq --out F [--n 8]
    python3 load.py tput --port P --label tput-pre --out F [--seconds 10] [--concurrency 16]

Class A is decode-heavy (a short prompt, many output tokens), class B prefill-heavy (a long
prompt, few output tokens). `periods` runs, per repetition, four periods of equal length in a
rotated order: nothing ("0"), A alone, B alone, A and B together ("AB"); each period is an
arrival window (open loop, each class at its fixed rate) followed by a drain of fixed length.
`seq` sends requests one at a time with idle gaps; `tput` keeps --concurrency A requests in
flight and counts streamed tokens per second. Every request is a streaming chat completion
with an `X-Request-Id` naming its label, class and number. One JSON line per request, per
period and per throughput window, with CLOCK_MONOTONIC times (the clock tracer's records use).
"""

import argparse
import http.client
import json
import random
import threading
import time

ORDERS = [["0", "A", "B", "AB"], ["AB", "B", "A", "0"], ["B", "AB", "0", "A"],
          ["A", "0", "AB", "B"]]
SHAPES = {  # class -> (prompt words, max_tokens)
    "gpu": {"A": (40, 128), "B": (1500, 4)},
    "tiny": {"A": (10, 24), "B": (300, 2)},
}
WORDS = ["kato", "rimu", "senva", "lope", "draqui", "zone", "baor", "anis", "elum", "fagi",
         "heju", "wyka", "tori", "musen", "valo", "pedra", "quizo", "neba", "thor", "anel"]

out_lock = threading.Lock()


def now():
    return time.monotonic_ns()


def emit(out, obj):
    with out_lock:
        out.write(json.dumps(obj) + "\n")
        out.flush()


def prompt(rng, words):
    # A fresh random prefix: no two prompts share a start, so no prefix cache hides a prefill.
    return " ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(words))


def request(a, port, rid, cls, label, rng, out, on_token=None):
    words, max_tokens = SHAPES[a.shape][cls]
    body = json.dumps({
        "model": a.model,
        "messages": [{"role": "user", "content": prompt(rng, words)}],
        "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}})
    rec = {"kind": "request", "label": label, "id": rid, "class": cls, "port": port,
           "start_ns": now(), "first_ns": None, "end_ns": None, "status": None, "events": 0,
           "prompt_tokens": None, "completion_tokens": None, "error": None}
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        c.request("POST", "/v1/chat/completions", body,
                  {"Content-Type": "application/json", "X-Request-Id": rid})
        r = c.getresponse()
        rec["status"] = r.status
        for line in r:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                rec["prompt_tokens"] = ev["usage"].get("prompt_tokens")
                rec["completion_tokens"] = ev["usage"].get("completion_tokens")
            for ch in ev.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    rec["events"] += 1
                    if rec["first_ns"] is None:
                        rec["first_ns"] = now()
                    if on_token:
                        on_token()
        c.close()
    except Exception as e:  # noqa: BLE001 - every failure is written down, none stops the run
        rec["error"] = repr(e)
    rec["end_ns"] = now()
    emit(out, rec)
    return rec


def sleep_until(t_ns):
    d = (t_ns - now()) / 1e9
    if d > 0:
        time.sleep(d)


def periods(a, out):
    rng = random.Random(a.seed)
    ports = {"A": a.port_a, "B": a.port_b}
    rates = {"A": a.rate_a, "B": a.rate_b}
    n = 0
    for rep in range(a.reps):
        for s in ORDERS[rep % len(ORDERS)]:
            start = now()
            threads = []
            schedule = []
            for cls in ("A", "B"):
                if cls in s:
                    step = 1e9 / rates[cls]
                    # B starts half an interval after A so arrivals interleave.
                    off = 0.0 if cls == "A" else step / 2
                    k = 0
                    while off + k * step < a.arrive_s * 1e9:
                        schedule.append((start + int(off + k * step), cls))
                        k += 1
            for t, cls in sorted(schedule):
                sleep_until(t)
                n += 1
                rid = f"{a.label}-{cls}-{n}"
                th = threading.Thread(target=request, args=(a, ports[cls], rid, cls, a.label,
                                                            random.Random(rng.random()), out))
                th.start()
                threads.append(th)
            end = start + int((a.arrive_s + a.drain_s) * 1e9)
            for th in threads:
                th.join(max(0.0, (end - now()) / 1e9))
            spill = sum(1 for th in threads if th.is_alive())
            for th in threads:
                th.join()
            sleep_until(end)
            emit(out, {"kind": "period", "label": a.label, "rep": rep, "set": s,
                       "start_ns": start, "arrive_end_ns": start + int(a.arrive_s * 1e9),
                       "end_ns": max(end, now()), "requests": len(threads), "spill": spill})
            print(f"{a.label} rep {rep} {s:>2}: {len(threads)} requests, spill {spill}",
                  flush=True)


def seq(a, out):
    rng = random.Random(a.seed)
    time.sleep(a.gap_s)
    for i in range(a.n):
        cls = "AB"[i % 2]
        r = request(a, a.port, f"{a.label}-{cls}-{i + 1}", cls, a.label, rng, out)
        print(f"{a.label} {r['id']}: {(r['end_ns'] - r['start_ns']) / 1e9:.2f} s", flush=True)
        time.sleep(a.gap_s)


def tput(a, out):
    rng = random.Random(a.seed)
    tokens = [0]
    lock = threading.Lock()
    start = now()
    end = start + int(a.seconds * 1e9)

    def on_token():
        if now() < end:
            with lock:
                tokens[0] += 1

    def worker(w):
        i = 0
        while now() < end:
            i += 1
            request(a, a.port, f"{a.label}-A-{w}-{i}", "A", a.label,
                    random.Random(rng.random()), out, on_token)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(a.concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    emit(out, {"kind": "tput", "label": a.label, "start_ns": start, "end_ns": end,
               "tokens": tokens[0], "tokens_per_s": tokens[0] / a.seconds})
    print(f"{a.label}: {tokens[0] / a.seconds:.1f} tokens/s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["periods", "seq", "tput"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--model", default="reference")
    ap.add_argument("--shape", default="gpu", choices=sorted(SHAPES))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--port", type=int)
    ap.add_argument("--port-a", type=int)
    ap.add_argument("--port-b", type=int)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--arrive-s", type=float, default=10.0)
    ap.add_argument("--drain-s", type=float, default=4.0)
    ap.add_argument("--rate-a", type=float, default=2.0)
    ap.add_argument("--rate-b", type=float, default=2.0)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--gap-s", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=16)
    a = ap.parse_args()
    with open(a.out, "a") as out:
        {"periods": periods, "seq": seq, "tput": tput}[a.mode](a, out)


if __name__ == "__main__":
    main()
