"""Which peer to ask next and when to ask another one: per-peer load, latency and rate, kept pure.

Every peer answer feeds two figures: the peer's own exponentially weighted header latency (to
prefer fast peers) and a window of recent header latencies of all peers (to decide when an
answer is late). A request starts at the least-used peer, fastest first among equals; when its
headers have not come after the hedge delay, one more peer is asked. The delay is a percentile of
recent latencies once there are enough of them (a late answer is then an unusual one), never
more than the configured header wait, so a miss stays short even on a slow cluster. Body
transfers feed a third: each peer's smoothed rate. A peer the relay left for being slow is
ranked behind every other until it shows a good rate again. A rate is known for RATE_TTL_S after
it was measured, no longer: a link that slowed since must not stand for a fast peer.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.common.hostport import join_host_port
from services.common.percentile import percentile

DEFAULT_ALPHA = 0.3
DEFAULT_WINDOW = 128
DEFAULT_MIN_SAMPLES = 20
DEFAULT_PERCENTILE = 0.9
# A hedge earlier than this would mostly duplicate requests that are merely scheduled late.
MIN_HEDGE_DELAY_S = 0.002
DEFAULT_MAX_PEERS = 1024
# Seconds a peer's measured body rate is taken as what it would send now. Long enough to carry
# from one layer of a pull to the next, short enough that a link slowed since is not believed.
RATE_TTL_S = 30.0


@dataclass(frozen=True, slots=True, order=True)
class Peer:
    """A peer's registry endpoint as discovery announced it: an IP address, a port and the
    node's ID (hex; empty when discovery named none)."""

    address: str
    port: int
    node_id: str = field(default="", compare=False)

    @property
    def identity(self) -> str:
        """What the peer is judged by (quarantine): its node, whatever port it advertises."""
        return identity(self.node_id, str(self))

    def __str__(self) -> str:
        return join_host_port(self.address, self.port)


def identity(node_id: str, endpoint: str) -> str:
    """What a peer is judged by: its node ID (hex) when known, else its registry endpoint
    (host:port)."""
    return f"node:{node_id}" if node_id else f"endpoint:{endpoint}"


def peer_from_contact(address: str, port: int, node_id: bytes = b"") -> Peer | None:
    """A Peer for a discovery contact; None unless `address` is an IP literal and `port` usable
    (names are never resolved: only addresses discovery observed are dialled)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if not 0 < port <= 65535 or ip.is_unspecified or ip.is_multicast:
        return None
    return Peer(ip.compressed, port, node_id.hex())


@dataclass(slots=True)
class PeerLoad:
    """What is known about one peer: requests in flight, its smoothed header latency and body
    rate (bytes per second), and whether a relay left it for being slow."""

    in_flight: int = 0
    latency: float | None = None
    rate: float | None = None
    # When `rate` was last measured (the book's clock).
    rate_at: float = 0.0
    slow: bool = False


class PeerBook:
    """Load and latency of the peers this registry talks to (single event loop, no locking)."""

    def __init__(
        self,
        *,
        alpha: float = DEFAULT_ALPHA,
        window: int = DEFAULT_WINDOW,
        min_samples: int = DEFAULT_MIN_SAMPLES,
        quantile: float = DEFAULT_PERCENTILE,
        max_peers: int = DEFAULT_MAX_PEERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.alpha = alpha
        self._clock = clock
        self.min_samples = min_samples
        self.quantile = quantile
        self.max_peers = max_peers
        self.recent: deque[float] = deque(maxlen=window)
        self._peers: OrderedDict[Peer, PeerLoad] = OrderedDict()

    def load(self, peer: Peer) -> PeerLoad:
        """The record of `peer` (a fresh one when unknown); the book stays bounded."""
        record = self._peers.get(peer)
        if record is None:
            record = self._peers[peer] = PeerLoad()
            self._trim()
        else:
            self._peers.move_to_end(peer)
        return record

    def _trim(self) -> None:
        # Forget the least recently used idle peers; busy ones are still being counted.
        while len(self._peers) > self.max_peers:
            victim = next((p for p, r in self._peers.items() if r.in_flight == 0), None)
            if victim is None:
                return
            del self._peers[victim]

    def record(self, peer: Peer) -> PeerLoad | None:
        """What is known of `peer` (None: nothing), without counting it as used."""
        return self._peers.get(peer)

    def known(self) -> list[Peer]:
        """Every peer the book has a record of, least recently used first."""
        return list(self._peers)

    def begin(self, peer: Peer) -> None:
        """A request to `peer` started."""
        self.load(peer).in_flight += 1

    def end(self, peer: Peer) -> None:
        """A request to `peer` started with `begin` finished (any way)."""
        record = self.load(peer)
        record.in_flight = max(0, record.in_flight - 1)

    def observe(self, peer: Peer, latency: float) -> None:
        """`peer` sent response headers `latency` seconds after it was asked."""
        latency = max(0.0, latency)
        record = self.load(peer)
        record.latency = (
            latency
            if record.latency is None
            else self.alpha * latency + (1 - self.alpha) * record.latency
        )
        self.recent.append(latency)

    def penalise(self, peer: Peer, latency: float) -> None:
        """`peer` failed to answer within `latency` seconds: rank it behind peers that answer
        faster, without letting a dead peer skew the cluster-wide hedge delay."""
        record = self.load(peer)
        record.latency = max(record.latency or 0.0, latency)

    def observe_rate(self, peer: Peer, rate: float) -> None:
        """`peer` sent body bytes at `rate` bytes per second."""
        record = self.load(peer)
        known = self._fresh(record)
        record.rate = rate if known is None else self.alpha * rate + (1 - self.alpha) * known
        record.rate_at = self._clock()
        record.slow = False

    def rank_down(self, peer: Peer, rate: float) -> None:
        """A relay left `peer` for sending at `rate`: ask it after every other peer."""
        record = self.load(peer)
        record.rate = rate
        record.rate_at = self._clock()
        record.slow = True

    def peak_rate(self, excluding: Peer | None = None) -> float | None:
        """The fastest smoothed rate of any peer not ranked down (but `excluding`): what this
        node's relays normally get."""
        rates = [
            rate
            for p, r in self._peers.items()
            if p != excluding and (rate := self._fresh(r)) is not None
        ]
        return max(rates) if rates else None

    def _fresh(self, record: PeerLoad) -> float | None:
        """The record's rate while it is recent and the peer not ranked down; else None."""
        if record.rate is None or record.slow:
            return None
        return record.rate if self._clock() - record.rate_at <= RATE_TTL_S else None

    def is_slow(self, peer: Peer) -> bool:
        """Whether a relay left `peer` for being slow (and it has not shown a good rate since)."""
        record = self._peers.get(peer)
        return record is not None and record.slow

    def rate(self, peer: Peer) -> float | None:
        """`peer`'s smoothed body rate (None: unknown, or ranked down as slow)."""
        record = self._peers.get(peer)
        return None if record is None else self._fresh(record)

    def choose(self, candidates: Sequence[Peer]) -> Peer | None:
        """The least-used candidate not ranked down as slow, fastest first among equals
        (unknown latency counts as fastest, so new peers get tried); ties keep discovery's
        order. None when empty."""
        best: Peer | None = None
        best_key: tuple[bool, int, float] | None = None
        for peer in candidates:
            record = self._peers.get(peer)
            key = (
                (False, 0, 0.0)
                if record is None
                else (record.slow, record.in_flight, record.latency or 0.0)
            )
            if best_key is None or key < best_key:
                best, best_key = peer, key
        return best

    def hedge_delay(self, header_wait: float) -> float:
        """How long to wait for headers before asking another peer: the configured
        `header_wait` until enough samples exist, then their percentile (bounded by it)."""
        if len(self.recent) < self.min_samples:
            return header_wait
        return min(header_wait, max(MIN_HEDGE_DELAY_S, percentile(self.recent, self.quantile)))
