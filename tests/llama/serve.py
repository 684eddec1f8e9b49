#!/usr/bin/env python3
"""Runs llama.cpp's `llama-server` for the third-party check: `serve.py BIN MODEL`.

Picks a free loopback port, then execs the server in this process (so the process the test
started is the server), while a forked helper waits for its `/health` and prints
`listening <port>` (the protocol of the other test servers) before exiting. Continuous batching
over 4 slots, 2 threads; an HTTP thread for each of up to 40 keep-alive connections (the
default pool, one thread per core, serves only that many connections at once).
"""
import os
import socket
import sys
import time
import urllib.request


def main():
    binary, model = sys.argv[1], sys.argv[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if os.fork() == 0:
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with direct.open("http://127.0.0.1:%d/health" % port, timeout=1) as r:
                    if r.status == 200:
                        print("listening %d" % port, flush=True)
                        os._exit(0)
            except OSError:
                pass
            time.sleep(0.2)
        print("llama-server did not become healthy", flush=True)
        os._exit(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the server's own output must not mix with the helper's line
    os.execv(binary, [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port),
                      "-c", "4096", "-np", "4", "-t", "2", "--threads-http", "40", "--no-webui"])


if __name__ == "__main__":
    main()
