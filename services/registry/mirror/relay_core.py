"""The relay's decisions without I/O: what to send, whom to ask next, whom to blame (sans-I/O).

In the spirit of h11: the driver (relay.py) does the I/O and feeds what happened into a
:class:`BlobRelay` — an answer began, body bytes arrived, the peer's body ended or failed, time
passed — and carries out the actions it gets back: send these bytes to the client, ask the next
peer for this range, rank a peer down, quarantine a peer, prove who lied, abort the client,
finish the response. Every rule of the relay lives here and is tested without sockets:

- the whole blob is read and hashed whatever the client asked for; only the client's window is
  sent, as it arrives, except the window's final piece, which goes out only once the whole blob
  hashes to its digest (so a body, or a 206 cut from one, is never completed unless right);
- a peer that fails, ends early, sends nothing for the stall timeout, takes longer than the
  attempt deadline, sends slower than the floor, or far slower than the fastest rate seen from
  another provider (judged early, after a fifth of the rate window, when that is known) is
  left, and the rest of the blob is asked for by Range from the next peer;
  slow peers are ranked down, never quarantined (slowness proves nothing);
- a body that does not hash to its digest is never completed; a peer is quarantined only on
  proof: the body came from it alone, or a second full read shows which span was wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from services.common.config import RegistrySection
from services.common.oci.document import digest_matches
from services.common.oci.grammar import GrammarError, parse_digest
from services.common.oci.media_types import (
    declared_media_type,
    detect_manifest_media_type,
    is_manifest_media_type,
)
from services.registry.mirror.hedging import Peer
from services.registry.mirror.verify import (
    DigestMismatchError,
    PeerAnswerError,
    RunningHash,
)
from services.registry.ranges import ByteRange

Chunk = bytes | memoryview
# A transfer shorter than this says little about a peer's rate (slow start, scheduling).
MIN_RATE_BYTES = 256 * 1024
# With another provider's rate known, an attempt is first judged after this share of the rate
# window: a congested link must not hold a pull for a whole window when a fast peer could take
# over (with 0.5 s windows that was most of a 256 MiB relay's clean time). A span that short is
# noisy (slow start, a scheduling hiccup), so its test is stricter: under this share of the
# window's ratio of the other provider's rate.
EARLY_SHARE = 0.2
EARLY_STRICTNESS = 0.25


@dataclass(frozen=True, slots=True)
class RatePolicy:
    """How fast a peer must send a body. The ``registry`` config section has the same keys (see
    RegistrySection for each), so the relay takes it as it is."""

    rate_window: float = 0.5
    min_peer_rate: float = 128 * 1024.0
    slow_peer_ratio: float = 0.2
    peer_attempt_timeout: float = 600.0
    peer_timeout: float = 2.0


Policy = RatePolicy | RegistrySection


# --- actions ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send `data` to the client (part of its window; more follows)."""

    data: Chunk


@dataclass(frozen=True, slots=True)
class Resume:
    """Stop reading the current answer; ask the next peer for bytes `start`..`end` (inclusive)."""

    start: int
    end: int
    reason: str


# Which rule found a peer slow: under the floor (min_peer_rate), under slow_peer_ratio of another
# provider over a window or at the early test, or past the attempt deadline.
SlowRule = Literal["floor", "ratio", "early", "deadline"]


@dataclass(frozen=True, slots=True)
class RankDown:
    """`peer` is slow by `rule`: ask it after the others from now on (it is not to blame
    otherwise)."""

    peer: Peer
    rate: float
    reason: str
    rule: SlowRule


@dataclass(frozen=True, slots=True)
class RecordRate:
    """`peer` sent body bytes at `rate` bytes per second (a sample for the peer book)."""

    peer: Peer
    rate: float


@dataclass(frozen=True, slots=True)
class QuarantinePeer:
    """`peer` is proven to have sent bytes that are not the blob's."""

    peer: Peer
    reason: str


@dataclass(frozen=True, slots=True)
class Prove:
    """The body did not hash to its digest and several peers sent parts of it: full reads of
    the blob from them (see :class:`Evidence`) decide which one lied."""

    evidence: Evidence


@dataclass(frozen=True, slots=True)
class AbortClient:
    """Cut the client connection short of its Content-Length: the body cannot be completed."""

    reason: str


@dataclass(frozen=True, slots=True)
class Finish:
    """The blob is verified: send `data`, the window's final piece, and end the response."""

    data: Chunk


Action = Send | Resume | RankDown | RecordRate | QuarantinePeer | Prove | AbortClient | Finish


# --- evidence ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Span:
    """Bytes [`start`, `end`) of a relayed body came from `peer`; `prefix` is the digest of the
    body's bytes [0, `end`) as received."""

    peer: Peer
    start: int
    end: int
    prefix: str


@dataclass(frozen=True, slots=True)
class Evidence:
    """What a failed body was made of, to be checked against a second full read."""

    digest: str
    size: int
    spans: tuple[Span, ...]

    def suspects(self) -> list[Peer]:
        """The contributors, the last one first (it is the likeliest honest one: it finished
        the body, and an honest full read convicts the first wrong span)."""
        return list(reversed(dict.fromkeys(span.peer for span in self.spans)))

    def check(self, reader: Peer) -> SpanCheck:
        """A checker for one full read of the blob from `reader`."""
        return SpanCheck(self, reader)


@dataclass(slots=True)
class SpanCheck:
    """Feeds a full read of the blob and compares it, span boundary by boundary, with the body
    that failed: once the read is complete, :meth:`verdict` names the peer proven to have lied."""

    evidence: Evidence
    reader: Peer
    _hash: RunningHash = field(init=False)
    _boundaries: list[Span] = field(init=False)
    # The first span whose prefix digest differs from the full read's.
    _diverged: Span | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._hash = RunningHash(self.evidence.digest)
        self._boundaries = sorted(self.evidence.spans, key=lambda s: s.end)

    @property
    def received(self) -> int:
        return self._hash.size

    def update(self, data: Chunk) -> None:
        """The next bytes of the full read (at most up to the blob's size)."""
        view = memoryview(data)
        while view:
            upcoming = next((s for s in self._boundaries if s.end > self._hash.size), None)
            take = len(view) if upcoming is None else min(len(view), upcoming.end - self._hash.size)
            self._hash.update(view[:take])
            view = view[take:]
            at_boundary = upcoming is not None and self._hash.size == upcoming.end
            if at_boundary and self._diverged is None:
                assert upcoming is not None
                if self._hash.prefix_digest() != upcoming.prefix:
                    self._diverged = upcoming

    def verdict(self) -> Peer | None:
        """The peer proven to have lied, or None when this read proves nothing (incomplete)."""
        if self._hash.size != self.evidence.size:
            return None
        if not self._hash.matches():
            return self.reader  # its whole body is not the blob: proof against it
        # The read is the blob: the first span that did not match it was wrong.
        return None if self._diverged is None else self._diverged.peer


# --- the blob relay ---------------------------------------------------------------------------


class BlobRelay:
    """One relayed blob GET: `size` bytes read and hashed against `digest`, `window` of them
    sent to the client. Feed events in order; act on what each returns, in order."""

    def __init__(self, digest: str, size: int, window: ByteRange, policy: Policy) -> None:
        self.digest = digest
        self.size = size
        self.policy = policy
        self._win_start = window.start
        self._win_end = window.end + 1
        self._hash = RunningHash(digest)
        self.offset = 0  # the next byte of the blob to read
        self.sent = 0  # window bytes handed out in Send actions
        self.done = False
        self.peer: Peer | None = None  # the peer being read, None between attempts
        self._held: Chunk = b""
        self._spans: list[Span] = []
        self._reference: float | None = None
        self._attempt_start = 0.0
        self._attempt_offset = 0
        self._rate_since = 0.0
        self._rate_offset = 0
        self._last_progress = 0.0

    # --- events -------------------------------------------------------------------------------

    def begin(self, peer: Peer, now: float, reference_rate: float | None = None) -> list[Action]:
        """An answer of `peer` whose body starts at :attr:`offset` is ready to be read.
        `reference_rate` is the fastest rate known of another provider that could take over
        (None: no such provider)."""
        self._require(not self.done and self.peer is None, "begin")
        self.peer = peer
        self._reference = reference_rate
        self._attempt_start = self._rate_since = self._last_progress = now
        self._attempt_offset = self._rate_offset = self.offset
        if self.offset >= self.size:
            return self._verdict()
        return []

    def refer_to(self, reference_rate: float | None) -> None:
        """The fastest rate now known of another provider that could take over (None: none
        could). The driver refreshes it while a body is read: other relays measure peers
        meanwhile, and a node's first pull knows no rate at all when its first relay begins.
        The only event that may come from another thread than the others (it is one
        attribute; the rules read it once per judgement)."""
        self._reference = reference_rate

    def received(self, data: Chunk, now: float) -> list[Action]:
        """Body bytes from the current peer, in order."""
        self._require(self.peer is not None, "received")
        if len(data) > self.size - self.offset:
            return self._leave(f"sent more than the {self.size} bytes announced", now)
        start = self.offset
        self._hash.update(data)
        self.offset += len(data)
        if data:
            self._last_progress = now
        actions: list[Action] = []
        low = min(max(self._win_start - start, 0), len(data))
        high = min(max(self._win_end - start, 0), len(data))
        if high > low:
            piece = data[low:high]
            if start + high == self._win_end:
                self._held = piece  # the window's final piece waits for the verdict
            else:
                actions.append(Send(piece))
                self.sent += len(piece)
        if self.offset >= self.size:
            actions += self._close_span(now)
            actions += self._verdict()
            return actions
        return actions + self.tick(now)

    def tick(self, now: float) -> list[Action]:
        """Time passed (the driver calls this at least every :meth:`next_check` seconds while
        reading): judges the current peer's rate, deadline and stall."""
        if self.peer is None or self.done:
            return []
        policy = self.policy
        if now - self._last_progress >= policy.peer_timeout:
            return self._leave(f"sent no body bytes for {policy.peer_timeout:g} s", now)
        if now - self._attempt_start >= policy.peer_attempt_timeout:
            return self._leave_slow(
                "deadline",
                f"took over {policy.peer_attempt_timeout:g} s",
                self._attempt_rate(now),
                now,
            )
        elapsed = now - self._rate_since
        if elapsed < policy.rate_window:
            return self._early_judgement(elapsed, now)
        rate = (self.offset - self._rate_offset) / elapsed
        self._rate_since, self._rate_offset = now, self.offset
        if rate < policy.min_peer_rate:
            return self._leave_slow(
                "floor",
                f"sent {rate:.0f} B/s, below the floor of {policy.min_peer_rate:.0f} B/s",
                rate,
                now,
            )
        reference = self._reference
        if reference is not None and rate < policy.slow_peer_ratio * reference:
            return self._leave_slow(
                "ratio",
                f"sent {rate:.0f} B/s, under {policy.slow_peer_ratio:g} of another provider's "
                f"{reference:.0f} B/s",
                rate,
                now,
            )
        assert self.peer is not None
        return [RecordRate(self.peer, rate)]

    def next_check(self, now: float) -> float:
        """Seconds until :meth:`tick` may have something to decide."""
        policy = self.policy
        due = min(
            self._last_progress + policy.peer_timeout,
            self._attempt_start + policy.peer_attempt_timeout,
            self._rate_since + policy.rate_window,
        )
        early = self._early_due(self._reference)
        if early is not None and early > now:
            due = min(due, early)
        return max(0.0, due - now)

    def ended(self, now: float) -> list[Action]:
        """The current peer's body ended (end of stream) before the blob was complete."""
        self._require(self.peer is not None, "ended")
        return self._leave(f"body ended at byte {self.offset}", now)

    def failed(self, reason: str, now: float) -> list[Action]:
        """The current peer's body failed (connection error, bad framing)."""
        self._require(self.peer is not None, "failed")
        return self._leave(reason, now)

    def exhausted(self, reason: str) -> list[Action]:
        """No peer could take over at :attr:`offset`: the client gets a cut body."""
        self._require(self.peer is None and not self.done, "exhausted")
        self.done = True
        return [AbortClient(f"no peer could continue at byte {self.offset}: {reason}")]

    # --- internals ----------------------------------------------------------------------------

    def _require(self, condition: bool, event: str) -> None:
        if not condition:
            raise RuntimeError(f"relay event {event!r} out of order")

    def _early_due(self, reference: float | None) -> float | None:
        """When the attempt's early judgement may come (None: there is none: no other
        provider's rate is known, or the attempt's first window is over)."""
        if reference is None or self._rate_since != self._attempt_start:
            return None
        return self._attempt_start + EARLY_SHARE * self.policy.rate_window

    def _early_judgement(self, elapsed: float, now: float) -> list[Action]:
        reference = self._reference  # once: refer_to() may change it from another thread
        if reference is None:
            return []
        early = self._early_due(reference)
        if early is None or now < early:
            return []
        rate = (self.offset - self._rate_offset) / elapsed
        threshold = EARLY_STRICTNESS * self.policy.slow_peer_ratio * reference
        if rate >= threshold:
            return []
        return self._leave_slow(
            "early",
            f"sent {rate:.0f} B/s in its first {elapsed:.2g} s, under {threshold:.0f} B/s "
            f"(another provider sends {reference:.0f} B/s)",
            rate,
            now,
        )

    def _attempt_rate(self, now: float) -> float:
        elapsed = now - self._attempt_start
        return (self.offset - self._attempt_offset) / elapsed if elapsed > 0 else 0.0

    def _close_span(self, now: float) -> list[Action]:
        """The current attempt is over: its span is recorded, its rate sampled."""
        peer = self.peer
        assert peer is not None
        self.peer = None
        actions: list[Action] = []
        if self.offset > self._attempt_offset:
            self._spans.append(
                Span(peer, self._attempt_offset, self.offset, self._hash.prefix_digest())
            )
            if self.offset - self._attempt_offset >= MIN_RATE_BYTES:
                actions.append(RecordRate(peer, self._attempt_rate(now)))
        return actions

    def _leave(self, reason: str, now: float) -> list[Action]:
        actions = self._close_span(now)
        return [*actions, Resume(self.offset, self.size - 1, reason)]

    def _leave_slow(self, rule: SlowRule, reason: str, rate: float, now: float) -> list[Action]:
        peer = self.peer
        assert peer is not None
        self._close_span(now)  # a slow peer's rate is the RankDown's, not a sample
        return [RankDown(peer, rate, reason, rule), Resume(self.offset, self.size - 1, reason)]

    def _verdict(self) -> list[Action]:
        self.done = True
        self.peer = None
        if self._hash.matches():
            held, self._held = self._held, b""
            self.sent += len(held)
            return [Finish(held)]
        reason = f"relayed body does not hash to {self.digest}"
        contributors = list(dict.fromkeys(span.peer for span in self._spans))
        if len(contributors) == 1:
            return [QuarantinePeer(contributors[0], reason), AbortClient(reason)]
        evidence = Evidence(self.digest, self.size, tuple(self._spans))
        return [Prove(evidence), AbortClient(reason)]


# --- manifests and answers ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerManifest:
    """A manifest a peer sent that passed every check."""

    digest: str
    body: bytes
    media_type: str


def manifest_answer(
    digest_asked: str | None, headers: Mapping[str, str], body: bytes, *, digest_header: str
) -> PeerManifest:
    """Check a peer's 200 answer to a manifest request (`digest_asked` None: a tag, whose
    digest the peer names). Raises DigestMismatchError when the bytes are not the digest's
    (proof against the peer), PeerAnswerError for any other unusable answer.

    The media type is the one the verified body declares when it declares one; a peer header
    naming another manifest type is a bad answer (containerd would fail the pull on it)."""
    named = headers.get(digest_header)
    if digest_asked is not None:
        expected = digest_asked
    else:
        if named is None:
            raise PeerAnswerError(f"tag answer has no {digest_header} header")
        try:
            expected = str(parse_digest(named.strip()))
        except GrammarError as exc:
            raise PeerAnswerError(f"tag answer names an unusable digest: {exc}") from None
    if not digest_matches(expected, body):
        raise DigestMismatchError(f"manifest body does not hash to {expected}")
    if named is not None and digest_asked is not None and named.strip() != digest_asked:
        raise PeerAnswerError(f"answer names {named.strip()}, not {digest_asked}")
    header_type = headers.get("Content-Type", "").split(";", 1)[0].strip()
    declared = declared_media_type(body)
    if declared is not None:
        if is_manifest_media_type(header_type) and header_type != declared:
            raise PeerAnswerError(f"answer is typed {header_type}, its body {declared}")
        if not is_manifest_media_type(declared):
            raise PeerAnswerError(f"body declares {declared}, not a manifest or index type")
        return PeerManifest(expected, body, declared)
    if is_manifest_media_type(header_type):
        return PeerManifest(expected, body, header_type)
    detected = detect_manifest_media_type(body)
    if detected is None:
        raise PeerAnswerError("answer is not a manifest or index")
    return PeerManifest(expected, body, detected)


def best_rate(rates: Sequence[float | None]) -> float | None:
    """The fastest of the known `rates` (None when none is known)."""
    known = [r for r in rates if r is not None]
    return max(known) if known else None
