#!/usr/bin/env python3
"""A TLS client tunnel for the tests: `tls_tunnel.py PORT` listens on a loopback port of its own
(printed as `listening <port>`) and forwards each plain-TCP connection to 127.0.0.1:PORT over
TLS (certificate not checked: the test server's is self-signed), byte for byte both ways. A
plain-HTTP test client behind it sees exactly the plaintext the HTTPS server reads and writes.
One asyncio loop: an SSL object is never used by two threads at once.
"""
import asyncio
import socket
import ssl
import sys


async def pump(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (OSError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    port = int(sys.argv[1])
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    async def handle(creader, cwriter):
        cwriter.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            ureader, uwriter = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        except OSError:
            cwriter.close()
            return
        await asyncio.gather(pump(creader, uwriter), pump(ureader, cwriter))

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=128)
    print("listening %d" % server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
