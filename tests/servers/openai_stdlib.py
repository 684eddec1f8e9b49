#!/usr/bin/env python3
"""A minimal OpenAI-style server on the Python standard library, for the probe tests.

HTTP/1.1 keep-alive (ThreadingHTTPServer). POST /v1/chat/completions with a JSON body:
- "stream": true  -> chunked `text/event-stream`: one `data: {...}` event per token, a final
  usage chunk (`"choices": []`) when stream_options.include_usage, then `data: [DONE]`. Each event
  is its own chunk written with its own write() (as uvicorn does).
  With "tail_segments": N, the usage chunk, [DONE] and the terminator go out in one writev of N
  segments (as Node's http module writes them).
- otherwise       -> one JSON body with `usage`, Content-Length framing.
The number of completion tokens is the request's max_tokens. With --blocking-accept it waits in
a blocking accept() instead of a selector. With --tls CERT KEY it serves HTTPS (OpenSSL through
Python's ssl module, a socket BIO); with --unix PATH, HTTP on that Unix socket (`listening 0`).
Prints `listening <port>` when ready.
"""
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = b'{"status":"ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        req = json.loads(self.rfile.read(length) or b"{}")
        n = int(req.get("max_tokens", 4))
        # A CPU-bound engine: "burn_ms" of pure computation before answering.
        until = time.process_time() + float(req.get("burn_ms", 0)) / 1000.0
        while time.process_time() < until:
            pass
        prompt = len(json.dumps(req.get("messages", []))) // 4
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        rid = self.headers.get("X-Request-Id")
        if req.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            if rid:
                self.send_header("X-Request-Id", rid)
            self.end_headers()
            self.wfile.flush()

            def chunk(data: bytes):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            for i in range(n):
                ev = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": req.get("model"),
                      "choices": [{"index": 0, "delta": {"content": "tok%d " % i}}]}
                chunk(b"data: " + json.dumps(ev).encode() + b"\n\n")
            tail = []
            if req.get("stream_options", {}).get("include_usage"):
                ev = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": usage}
                tail.append(b"data: " + json.dumps(ev).encode() + b"\n\n")
            tail.append(b"data: [DONE]\n\n")
            segments = int(req.get("tail_segments", 0))
            if segments:
                # As Node does: the last chunks and the terminator in one writev, each chunk as
                # size line, data and CRLF, the data cut into pieces up to `segments` in all.
                bufs = []
                for data in tail:
                    bufs += [b"%x\r\n" % len(data), data, b"\r\n"]
                bufs.append(b"0\r\n\r\n")
                while len(bufs) < segments:
                    i = max(range(len(bufs)), key=lambda k: len(bufs[k]))
                    if len(bufs[i]) < 2:
                        break
                    bufs[i:i + 1] = [bufs[i][:len(bufs[i]) // 2], bufs[i][len(bufs[i]) // 2:]]
                os.writev(self.connection.fileno(), bufs)
            else:
                for data in tail:
                    chunk(data)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
        else:
            body = json.dumps({"id": "chatcmpl-2", "object": "chat.completion", "model": req.get("model"),
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * n}}],
                               "usage": usage}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if rid:
                self.send_header("X-Request-Id", rid)
            self.end_headers()
            self.wfile.write(body)


if __name__ == "__main__":
    ThreadingHTTPServer.request_queue_size = 128  # many clients connect at once
    if "--unix" in sys.argv:
        import socketserver

        class UnixHTTPServer(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True
            request_queue_size = 128

        path = sys.argv[sys.argv.index("--unix") + 1]
        if os.path.exists(path):
            os.unlink(path)
        server = UnixHTTPServer(path, Handler)
        print("listening 0", flush=True)
        server.serve_forever()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if "--tls" in sys.argv:
        import ssl

        at = sys.argv.index("--tls")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(sys.argv[at + 1], sys.argv[at + 2])
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print("listening %d" % server.server_address[1], flush=True)
    if "--blocking-accept" in sys.argv:
        # A thread-per-connection server idle in accept() (as llama.cpp's llama-server is):
        # whoever attaches meanwhile sees the accept's exit, not its entry.
        while True:
            conn, addr = server.socket.accept()
            server.process_request(conn, addr)
    server.serve_forever()
