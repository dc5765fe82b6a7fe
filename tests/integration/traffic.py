"""Traffic generators run inside test namespaces (as `python -c` programs)."""

from __future__ import annotations

from tests.integration.netenv import Netns

# A TCP server that accepts `count` connections, reads, answers, and closes; runs in a thread
# in the same program as the client when both ends are in one namespace.
TCP_PAIR = r"""
import socket, sys, threading
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
server = socket.socket(family, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen(8)
def serve():
    conn, _ = server.accept()
    conn.recv(100)
    conn.sendall(b"pong")
    conn.close()
thread = threading.Thread(target=serve)
thread.start()
client = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
client.sendall(b"ping")
assert client.recv(100) == b"pong"
client.close()
thread.join(5)
print("ok")
"""

UDP_PAIR = r"""
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
server = socket.socket(family, socket.SOCK_DGRAM)
server.bind((sys.argv[1], int(sys.argv[2])))
client = socket.socket(family, socket.SOCK_DGRAM)
client.settimeout(5)
client.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
data, peer = server.recvfrom(100)
server.sendto(b"pong", peer)
assert client.recv(100) == b"pong"
print(client.getsockname()[1])
"""

# Client side only (the server runs elsewhere): connect, exchange, print our source port.
TCP_CLIENT = r"""
import socket, sys
client = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
client.sendall(b"ping")
assert client.recv(100) == b"pong"
print(client.getsockname()[1])
client.close()
"""

TCP_SERVER = r"""
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
server = socket.socket(family, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen(8)
server.settimeout(float(sys.argv[4]))
print("ready", flush=True)
for _ in range(int(sys.argv[3])):
    conn, _ = server.accept()
    conn.recv(100)
    conn.sendall(b"pong")
    conn.close()
"""

UDP_BURST = r"""
import socket, sys, time
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
sock = socket.socket(family, socket.SOCK_DGRAM)
count, first, pause = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + 20
for port in range(first, first + count):
    sock.sendto(b"x", (sys.argv[1], port))
    if pause:
        time.sleep(pause)
    if time.monotonic() > deadline:
        break
"""


def tcp_exchange(ns: Netns, address: str, port: int) -> None:
    """One TCP connection with data both ways, client and server in `ns`."""
    ns.python(TCP_PAIR, address, str(port))


def udp_exchange(ns: Netns, address: str, port: int) -> int:
    """One UDP request/response in `ns`; returns the client's source port."""
    return int(ns.python(UDP_PAIR, address, str(port)).strip())


def ping(ns: Netns, address: str) -> None:
    """One ICMP or ICMPv6 echo."""
    ns.run("ping", "-c", "1", "-W", "2", address)


def udp_burst(ns: Netns, address: str, count: int, first_port: int = 20000,
              pause: float = 0.0) -> None:
    """`count` one-packet UDP flows to consecutive ports (bounded in count and 20 s)."""
    ns.python(UDP_BURST, address, str(count), str(first_port), str(pause))
