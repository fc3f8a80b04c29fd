"""Issue 25's "nothing fails": a registry store's read deadline tells a registry that is slow but moving
from one that is stalled.  Liars on 127.0.0.1 in front of the real docker-registry (tests/liar_registry.py):
an answer trickled steadily for longer than the deadline is read; a queue of reads behind an overloaded
registry is waited for; a registry that accepts and then sends nothing still fails at the deadline (and is
marked down: the next read fails at once)."""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from liar_registry import Endless, LiarRegistry

from convstore.errors import RegistryTimeout
from convstore.oci.registry_client import RegistryClient

DEADLINE = 1.0


@pytest.fixture
def blob(registry):
    """A 40 kB blob in the real registry: (repo, digest, bytes)."""
    data = os.urandom(40_000)
    digest = RegistryClient(registry.host, insecure=True).put_blob("deadline/a", data)
    return "deadline/a", digest, data


@pytest.fixture
def liar(registry):
    lr = LiarRegistry(registry.host)
    yield lr
    lr.stop()


def test_an_answer_trickled_steadily_for_longer_than_the_deadline_is_read(blob, liar):
    repo, digest, data = blob
    trickle = Endless(content_type="application/octet-stream", data=data[:30_000], piece=1500, pause=0.15)
    liar.lie = lambda m, p: trickle if m == "GET" and "/blobs/" in p else None
    client = RegistryClient(liar.host, insecure=True, deadline=DEADLINE)
    t = time.monotonic()
    got = client.get_blob(repo, digest, 0, 30_000)
    took = time.monotonic() - t
    assert got == data[:30_000]
    assert took > 2 * DEADLINE, f"{took:.2f} s: the answer did not take longer than the deadline"
    assert client.counters.timeouts == 0 and liar.requests_for("GET", "/blobs/") == 1


def test_a_queue_of_reads_behind_an_overloaded_registry_all_succeed(blob, liar):
    """8 reads at once, served one at a time, 0.4 s each: the last answer comes after 3.2 s, three deadlines,
    but an answer arrives every 0.4 s: the registry is moving, not stalled."""
    repo, digest, data = blob
    liar.queue, liar.hold = threading.Semaphore(1), 0.4
    client = RegistryClient(liar.host, insecure=True, deadline=DEADLINE)
    client.get_blob(repo, digest, 0, 10)  # a token, if any, and a connection: then the queue
    t = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: client.get_blob(repo, digest, i * 1000, i * 1000 + 1000), range(8)))
    took = time.monotonic() - t
    assert got == [data[i * 1000 : i * 1000 + 1000] for i in range(8)]
    assert took > 3 * DEADLINE, f"{took:.2f} s: the reads were not queued past the deadline"
    assert client.counters.timeouts == 0 and client.counters.fast_failures == 0


def test_a_registry_that_accepts_and_sends_nothing_fails_at_the_deadline():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    host = f"127.0.0.1:{silent.getsockname()[1]}"
    held: list[socket.socket] = []

    def accept() -> None:  # takes every request and answers nothing
        while True:
            try:
                c, _ = silent.accept()
            except OSError:
                return
            held.append(c)

    threading.Thread(target=accept, daemon=True).start()
    client = RegistryClient(host, insecure=True, deadline=DEADLINE)
    try:
        t = time.monotonic()
        with pytest.raises(RegistryTimeout, match=f"registry {host}"):
            client.get_blob("x/y", "sha256:" + "0" * 64, 0, 10)
        took = time.monotonic() - t
        assert DEADLINE - 0.05 < took < DEADLINE + 1.0, took
        t = time.monotonic()
        with pytest.raises(RegistryTimeout, match="marked down"):  # outage detection: the next fails at once
            client.get_blob("x/y", "sha256:" + "0" * 64, 0, 10)
        assert time.monotonic() - t < 0.5
    finally:
        silent.close()
        for c in held:
            c.close()


def test_an_answer_that_stops_midway_fails_at_the_deadline(blob, liar):
    repo, digest, data = blob
    stops = Endless(content_type="application/octet-stream", data=data[:30_000], piece=1500, pause=60)
    liar.lie = lambda m, p: stops if m == "GET" and "/blobs/" in p else None
    client = RegistryClient(liar.host, insecure=True, deadline=DEADLINE)
    t = time.monotonic()
    with pytest.raises(RegistryTimeout):
        client.get_blob(repo, digest, 0, 30_000)
    took = time.monotonic() - t
    assert DEADLINE - 0.05 < took < DEADLINE + 1.0, took
    assert stops.sent == 1500  # one piece, then silence
