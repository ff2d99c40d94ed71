"""The relay's pump threads over real socket pairs: order, hashing, the held chunk, failures."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from services.registry.mirror.socket_pump import (
    ClientWriteError,
    Hasher,
    PumpJob,
    PumpOutcome,
    PumpStopped,
    run_pump,
)

CHUNK = 64 * 1024


class Ends:
    """Two socket pairs: the test writes the peer's side and reads the client's."""

    def __init__(self) -> None:
        self.peer_out, self.peer_in = socket.socketpair()
        self.client_in, self.client_out = socket.socketpair()
        for sock in (self.peer_in, self.client_in):
            sock.setblocking(False)  # as asyncio leaves them

    def close(self) -> None:
        for sock in (self.peer_out, self.peer_in, self.client_in, self.client_out):
            sock.close()

    def job(
        self,
        length: int,
        hasher: Hasher,
        window: tuple[int, int] | None = None,
        peer_stall_s: float = 5.0,
    ) -> PumpJob:
        write_start, write_stop = window or (0, length)
        return PumpJob(
            peer_fd=self.peer_in.fileno(),
            client_fd=self.client_in.fileno(),
            length=length,
            write_start=write_start,
            write_stop=write_stop,
            hasher=hasher,
            chunk_bytes=CHUNK,
            peer_stall_s=peer_stall_s,
            client_stall_s=5.0,
        )


@pytest.fixture
def ends() -> Iterator[Ends]:
    pair = Ends()
    yield pair
    pair.close()


def feed(sock: socket.socket, data: bytes, *, then_close: bool = False) -> threading.Thread:
    def run() -> None:
        try:
            sock.sendall(data)
            if then_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # the test closed the other end on purpose
            pass

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def drain(sock: socket.socket, into: bytearray) -> threading.Thread:
    def run() -> None:
        while chunk := sock.recv(1 << 20):
            into.extend(chunk)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def pump_all(ends: Ends, job: PumpJob, stop: threading.Event | None = None) -> PumpOutcome:
    try:
        return run_pump(job, stop or threading.Event())
    finally:
        ends.client_in.shutdown(socket.SHUT_WR)


def test_body_is_moved_in_order_hashed_and_its_last_chunk_held(ends: Ends) -> None:
    body = os.urandom(5 * CHUNK + 123)
    hasher = hashlib.sha256()
    received = bytearray()
    writer, reader = feed(ends.peer_out, body), drain(ends.client_out, received)
    outcome = pump_all(ends, ends.job(len(body), hasher))
    writer.join()
    reader.join()
    assert outcome.peer_error is None
    assert outcome.received == len(body)
    assert outcome.held == body[-len(outcome.held) :] and 0 < len(outcome.held) <= CHUNK
    assert bytes(received) + outcome.held == body
    assert outcome.written == len(received)
    assert hasher.hexdigest() == hashlib.sha256(body).hexdigest()


def test_only_the_window_is_written_but_everything_is_hashed(ends: Ends) -> None:
    body = os.urandom(6 * CHUNK)
    window = (CHUNK + 100, 3 * CHUNK + 7)  # spans parts of three buffers
    hasher = hashlib.sha256()
    received = bytearray()
    writer, reader = feed(ends.peer_out, body), drain(ends.client_out, received)
    outcome = pump_all(ends, ends.job(len(body), hasher, window))
    writer.join()
    reader.join()
    wanted = body[window[0] : window[1]]
    assert outcome.peer_error is None and outcome.received == len(body)
    # The window's last piece (from the start of its buffer) is held, the rest written.
    assert outcome.held == body[3 * CHUNK : window[1]]
    assert bytes(received) + outcome.held == wanted
    assert hasher.hexdigest() == hashlib.sha256(body).hexdigest()


def test_a_window_already_sent_writes_nothing_and_holds_nothing(ends: Ends) -> None:
    body = os.urandom(2 * CHUNK)
    hasher = hashlib.sha256()
    received = bytearray()
    writer, reader = feed(ends.peer_out, body), drain(ends.client_out, received)
    outcome = pump_all(ends, ends.job(len(body), hasher, (0, 0)))
    writer.join()
    reader.join()
    assert outcome == PumpOutcome(len(body), 0, b"", None)
    assert received == b""
    assert hasher.hexdigest() == hashlib.sha256(body).hexdigest()


def test_a_peer_closing_early_is_reported_after_its_bytes_are_hashed_and_written(
    ends: Ends,
) -> None:
    sent = os.urandom(2 * CHUNK + 10)
    hasher = hashlib.sha256()
    received = bytearray()
    writer = feed(ends.peer_out, sent, then_close=True)
    reader = drain(ends.client_out, received)
    outcome = pump_all(ends, ends.job(len(sent) + 1000, hasher))
    writer.join()
    reader.join()
    assert outcome.peer_error == f"body ended at byte {len(sent)}"
    assert outcome.received == outcome.written == len(sent)
    assert outcome.held == b""
    assert bytes(received) == sent
    assert hasher.hexdigest() == hashlib.sha256(sent).hexdigest()


def test_a_stalled_peer_is_given_up(ends: Ends) -> None:
    received = bytearray()
    reader = drain(ends.client_out, received)
    ends.peer_out.sendall(b"x" * 100)
    outcome = pump_all(ends, ends.job(1000, hashlib.sha256(), peer_stall_s=0.3))
    reader.join()
    assert outcome.peer_error == "peer sent no body bytes for 0.3 s"
    assert outcome.received == 100 and bytes(received) == b"x" * 100


def test_a_client_gone_is_an_error(ends: Ends) -> None:
    ends.client_out.close()
    writer = feed(ends.peer_out, os.urandom(4 * CHUNK))
    with pytest.raises(ClientWriteError):
        run_pump(ends.job(4 * CHUNK, hashlib.sha256()), threading.Event())
    ends.peer_in.close()  # unblocks the writer
    writer.join()


def test_a_stop_ends_a_waiting_pump(ends: Ends) -> None:
    stop = threading.Event()
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    with pytest.raises(PumpStopped):
        run_pump(ends.job(1000, hashlib.sha256()), stop)
    timer.join()


def test_the_lent_descriptors_stay_open(ends: Ends) -> None:
    body = b"y" * 10
    ends.peer_out.sendall(body)
    received = bytearray()
    reader = drain(ends.client_out, received)
    pump_all(ends, ends.job(len(body), hashlib.sha256()))
    reader.join()
    # The pump closed only its duplicates: the originals still work.
    ends.peer_out.sendall(b"z")
    assert ends.peer_in.recv(1) == b"z"
