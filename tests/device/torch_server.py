"""A vLLM-shaped inference server on a real GPU, for the device check.

The API process (stdlib HTTP, OpenAI-style /v1/completions with SSE streaming and usage) holds
no GPU; it forwards each request over a pipe (a Unix socketpair) to an engine process that
runs the "model": per output token, a few bf16 matrix products on the GPU, sized by the prompt
for the first (prefill) step. So the tracer must find the GPU through the engine, a
descendant of the process listening on the port.
"""

import json
import multiprocessing as mp
import queue
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def engine(conn, per_token):
    import torch

    dev = torch.device("cuda:0")
    n = 4096
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    conn.send(("ready", None, None))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        rid, prompt_tokens, max_tokens = msg
        # Prefill: work proportional to the prompt.
        for _ in range(max(1, prompt_tokens // 64)):
            c = a @ b
        torch.cuda.synchronize()
        for i in range(max_tokens):
            for _ in range(per_token):
                c = a @ b
            torch.cuda.synchronize()
            conn.send(("token", rid, i))
        conn.send(("done", rid, max_tokens))


class Api:
    def __init__(self, per_token):
        parent, child = mp.Pipe()
        self.proc = mp.get_context("fork").Process(
            target=engine, args=(child, per_token), daemon=True)
        self.proc.start()
        self.conn = parent
        self.lock = threading.Lock()
        self.queues = {}
        self.next = 0
        kind, _, _ = self.conn.recv()
        assert kind == "ready"
        threading.Thread(target=self.reader, daemon=True).start()

    def reader(self):
        while True:
            kind, rid, val = self.conn.recv()
            q = self.queues.get(rid)
            if q is not None:
                q.put((kind, val))

    def submit(self, prompt_tokens, max_tokens):
        with self.lock:
            rid = self.next
            self.next += 1
            q = queue.Queue()
            self.queues[rid] = q
            self.conn.send((rid, prompt_tokens, max_tokens))
        return rid, q


API = None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        prompt = body.get("prompt", "")
        prompt_tokens = max(1, len(prompt.split()))
        max_tokens = int(body.get("max_tokens", 16))
        rid, q = API.submit(prompt_tokens, max_tokens)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        if self.headers.get("X-Request-Id"):
            self.send_header("X-Request-Id", self.headers["X-Request-Id"])
        self.end_headers()

        def chunk(data):
            raw = data.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
            self.wfile.flush()

        while True:
            kind, val = q.get()
            if kind == "token":
                chunk("data: " + json.dumps({"object": "text_completion", "model": "torch-matmul",
                                              "choices": [{"index": 0, "text": " tok"}]}) + "\n\n")
            else:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": val,
                         "total_tokens": prompt_tokens + val}
                chunk("data: " + json.dumps({"object": "text_completion", "model": "torch-matmul",
                                              "choices": [], "usage": usage}) + "\n\n")
                chunk("data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                break
        del API.queues[rid]


def main():
    global API
    port = int(sys.argv[1])
    # Matrix products per output token: the "model size" (sets GPU time and power per token).
    per_token = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    API = Api(per_token)
    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"listening {port}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
