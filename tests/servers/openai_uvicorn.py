#!/usr/bin/env python3
"""A vLLM-shaped OpenAI server on uvicorn (a plain ASGI app, no framework), for the third-party
check: POST /v1/chat/completions, "stream": true gives SSE (one `data:` event per token, each
sent as its own ASGI message as vLLM's StreamingResponse does, a usage chunk when
stream_options.include_usage, then `data: [DONE]`), else one JSON body with `usage`.
Completion tokens = max_tokens, `token_delay_ms` between events; X-Request-Id echoed. uvicorn's own HTTP/1.1 (h11 or httptools),
keep-alive. With --tls CERT KEY it serves HTTPS (asyncio's SSL: OpenSSL through a memory BIO).
Prints `listening <port>` when ready.
"""
import asyncio
import json
import socket
import sys

import uvicorn


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    req = json.loads(body or b"{}")
    n = int(req.get("max_tokens") or 4)
    prompt = len(json.dumps(req.get("messages", []))) // 4
    usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
    headers = []
    for k, v in scope["headers"]:
        if k == b"x-request-id":
            headers.append((b"x-request-id", v))
    if req.get("stream"):
        headers.append((b"content-type", b"text/event-stream"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i in range(n):
            ev = {"id": "chatcmpl-u", "object": "chat.completion.chunk", "model": req.get("model"),
                  "choices": [{"index": 0, "delta": {"content": "tok%d " % i}}]}
            data = b"data: " + json.dumps(ev).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": data, "more_body": True})
            await asyncio.sleep(float(req.get("token_delay_ms") or 0) / 1000)
        if (req.get("stream_options") or {}).get("include_usage"):
            ev = {"id": "chatcmpl-u", "object": "chat.completion.chunk", "choices": [],
                  "usage": usage}
            data = b"data: " + json.dumps(ev).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
    else:
        out = json.dumps({"id": "chatcmpl-v", "object": "chat.completion",
                          "model": req.get("model"),
                          "choices": [{"index": 0,
                                       "message": {"role": "assistant", "content": "x" * n}}],
                          "usage": usage}).encode()
        headers += [(b"content-type", b"application/json"),
                    (b"content-length", str(len(out)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})


if __name__ == "__main__":
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print("listening %d" % sock.getsockname()[1], flush=True)
    tls = {}
    if "--tls" in sys.argv:
        at = sys.argv.index("--tls")
        tls = {"ssl_certfile": sys.argv[at + 1], "ssl_keyfile": sys.argv[at + 2]}
    config = uvicorn.Config(app, log_level="warning", access_log=False, backlog=128, **tls)
    uvicorn.Server(config).run(sockets=[sock])
