#!/usr/bin/env python3
"""An Ollama-shaped front server for the second-hop tests: it spawns an engine server
(openai_stdlib.py) as its child and forwards each request to it over loopback HTTP.

POST /api/chat with {"model", "messages", "options": {"num_predict": n}} -> a streamed NDJSON
response, one line per token the engine streamed (SSE, include_usage) and a final
{"done": true} line. Like a proxy that reports no token counts of its own: they are only in the
inner exchange. Thread per connection; one engine connection per request. With
--engine-port N it forwards to an engine already listening on N instead of spawning one; with
--engine-unix it spawns the engine on a Unix socket and forwards over that (HTTP on a Unix
socket, as a front and its runner can talk).
Prints `listening <port>` when ready.
"""
import ctypes
import http.client
import json
import os
import socket
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ENGINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openai_stdlib.py")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost")
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.unix_path)
        self.sock = s


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    engine_port = 0
    engine_unix = None

    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        req = json.loads(self.rfile.read(length) or b"{}")
        n = int(req.get("options", {}).get("num_predict", 4))
        inner = json.dumps({"model": req.get("model"), "messages": req.get("messages", []),
                            "stream": True, "stream_options": {"include_usage": True},
                            "max_tokens": n}).encode()
        if Handler.engine_unix:
            conn = UnixHTTPConnection(Handler.engine_unix)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", Handler.engine_port)
        try:
            conn.request("POST", "/v1/chat/completions", body=inner,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
        except OSError as e:
            # As a proxy does: the engine's failure is a 502, not a dropped connection.
            msg = ("engine: %s" % e).encode()
            self.send_response(502)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        rid = self.headers.get("X-Request-Id")
        if rid:
            self.send_header("X-Request-Id", rid)
        self.end_headers()

        def chunk(data: bytes):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        for line in resp:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            ev = json.loads(line[6:])
            for choice in ev.get("choices", []):
                text = choice.get("delta", {}).get("content", "")
                chunk(json.dumps({"model": req.get("model"), "message": {"content": text},
                                  "done": False}).encode() + b"\n")
        conn.close()
        chunk(json.dumps({"model": req.get("model"), "done": True}).encode() + b"\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


if __name__ == "__main__":
    engine = None
    if "--engine-port" in sys.argv:
        # An engine someone else started (another service).
        Handler.engine_port = int(sys.argv[sys.argv.index("--engine-port") + 1])
    else:
        # The engine dies with its front (tests kill the front with SIGKILL).
        libc = ctypes.CDLL(None, use_errno=True)
        args = [sys.executable, ENGINE]
        if "--engine-unix" in sys.argv:
            Handler.engine_unix = "/tmp/tracer-engine-%d.sock" % os.getpid()
            args += ["--unix", Handler.engine_unix]
        engine = subprocess.Popen(args, stdout=subprocess.PIPE, text=True,
                                  preexec_fn=lambda: libc.prctl(1, 9))  # PR_SET_PDEATHSIG, SIGKILL
        Handler.engine_port = int(engine.stdout.readline().split()[1])
    ThreadingHTTPServer.request_queue_size = 128  # many clients connect at once
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print("listening %d" % server.server_address[1], flush=True)
    try:
        server.serve_forever()
    finally:
        if engine:
            engine.kill()
