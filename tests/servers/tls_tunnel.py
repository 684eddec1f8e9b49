#!/usr/bin/env python3
"""A TLS client tunnel for the tests: `tls_tunnel.py PORT` listens on a loopback port of its own
(printed as `listening <port>`) and forwards each plain-TCP connection to 127.0.0.1:PORT over
TLS (certificate not checked: the test server's is self-signed), byte for byte both ways. A
plain-HTTP test client behind it sees exactly the plaintext the HTTPS server reads and writes.
"""
import socket
import ssl
import sys
import threading


def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def serve(conn, port, ctx):
    with conn:
        upstream = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)))
        with upstream:
            back = threading.Thread(target=pump, args=(upstream, conn), daemon=True)
            back.start()
            pump(conn, upstream)
            back.join()


def main():
    port = int(sys.argv[1])
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    print("listening %d" % listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(conn, port, ctx), daemon=True).start()


if __name__ == "__main__":
    main()
