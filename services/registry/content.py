"""Looks manifests and blobs up in the node's content store, through the cache.

Manifest or blob? The store keeps no media types for content, so the content decides:

- served from /manifests/: content of at most MAX_MANIFEST_BYTES that parses as a schema-2
  image manifest or index (``mediaType`` field, or the OCI shape); anything else, e.g. a layer or
  a config JSON, is MANIFEST_UNKNOWN there;
- served from /blobs/: everything else. Content that parses as a manifest or index is
  BLOB_UNKNOWN there, so a client that mixes the endpoints up falls back instead of getting
  bytes it did not ask for. Only content starting with ``{`` (after whitespace) and no larger
  than MAX_MANIFEST_BYTES is ever read to decide; layers are told apart by their first bytes.

Manifest bodies are checked against their digest before being served or cached, since a client
would reject a mismatch only after the fact. Store failures other than "not found" (containerd
down, I/O errors: the contract's :class:`StoreUnavailableError`) become a 404 all the same, so
containerd falls back at once; :func:`store_failed` tells them from a miss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from services.common.logsetup import get_logger
from services.common.oci.document import digest_matches
from services.common.oci.errors import ErrorCode, OciError
from services.common.oci.media_types import detect_manifest_media_type, is_manifest_media_type
from services.common.store.protocol import (
    ContentNotFoundError,
    ContentStore,
    Descriptor,
    StoreUnavailableError,
)
from services.registry.backend import StoreKeeper
from services.registry.cache import BlobFacts, ContentCache, Manifest

# The distribution reference implementation refuses manifests above 4 MiB as well.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
SNIFF_BYTES = 64
_JSON_WHITESPACE = b" \t\r\n"

log = get_logger(__name__)


def _unavailable(code: ErrorCode, what: str, exc: StoreUnavailableError) -> OciError:
    """A store failure as a 404 so the client falls back; its cause stays `exc`, which tells it
    from a plain miss (see :func:`store_failed`)."""
    # The backend's own failure names the reason when the contract's error only wraps it.
    failure = exc.__cause__ if type(exc) is StoreUnavailableError else exc
    reason = str(exc) if failure is None else f"{type(failure).__name__}: {failure}"
    error = OciError(
        code,
        f"content store unavailable ({reason})",
        detail={"what": what},
        status=404,
    )
    error.__cause__ = exc
    return error


@contextlib.contextmanager
def _store_errors(missing: OciError, doing: str, reference: str) -> Iterator[None]:
    """The store contract's errors as answers: not found is `missing`; unavailable is a 404 of
    the same code that :func:`store_failed` tells from a miss (logged, saying what failed)."""
    try:
        yield
    except ContentNotFoundError:
        raise missing from None
    except StoreUnavailableError as exc:
        log.warning(f"store failed {doing}", reference=reference, error=str(exc))
        raise _unavailable(missing.code, reference, exc) from exc


def store_failed(error: OciError) -> bool:
    """Whether `error` answers a store failure rather than content this node lacks."""
    return isinstance(error.__cause__, StoreUnavailableError)


@dataclass(frozen=True, slots=True)
class Blob:
    """A blob ready to serve: its size and, when the store exposes one, a file holding it."""

    digest: str
    size: int
    path: Path | None


def _looks_like_json_object(head: bytes) -> bool:
    return head.lstrip(_JSON_WHITESPACE).startswith(b"{")


class ContentService:
    """Manifest and blob lookups for the handlers; every miss or failure is an OciError."""

    def __init__(self, keeper: StoreKeeper) -> None:
        self.keeper = keeper

    @property
    def cache(self) -> ContentCache:
        return self.keeper.cache

    def _store(self, code: ErrorCode, what: str) -> ContentStore:
        store = self.keeper.store
        if store is None:
            raise _unavailable(code, what, StoreUnavailableError("not opened yet"))
        return store

    async def _read_all(self, store: ContentStore, digest: str, limit: int) -> bytes:
        parts: list[bytes] = []
        async for chunk in store.read(digest, 0, limit):
            parts.append(chunk)
        return b"".join(parts)

    # --- manifests ---------------------------------------------------------------------------

    async def resolve_tag(self, key: str) -> Descriptor:
        """The target of image `key` (``<registry>/<name>:<tag>``)."""
        cached = self.cache.tag(key)
        if cached is not None:
            return cached
        store = self._store(ErrorCode.MANIFEST_UNKNOWN, key)
        generation = self.cache.generation
        missing = OciError(
            ErrorCode.MANIFEST_UNKNOWN, f"no image {key} on this node", detail={"tag": key}
        )
        with _store_errors(missing, "resolving a tag", key):
            target = await store.resolve(key)
        self.cache.put_tag(key, target, generation)
        return target

    async def manifest(self, digest: str, media_type_hint: str = "") -> Manifest:
        """Manifest `digest`; `media_type_hint` (an image record's) wins over detection."""
        cached = self.cache.manifest(digest)
        if cached is None:
            cached = await self._load_manifest(digest)
        if (
            media_type_hint
            and media_type_hint != cached.media_type
            and is_manifest_media_type(media_type_hint)
        ):
            return Manifest(cached.digest, cached.body, media_type_hint)
        return cached

    async def _load_manifest(self, digest: str) -> Manifest:
        store = self._store(ErrorCode.MANIFEST_UNKNOWN, digest)
        generation = self.cache.generation
        unknown = OciError(
            ErrorCode.MANIFEST_UNKNOWN,
            f"no manifest {digest} on this node",
            detail={"digest": digest},
        )
        with _store_errors(unknown, "reading a manifest", digest):
            size = await store.stat(digest)
            if size > MAX_MANIFEST_BYTES:
                raise unknown
            body = await self._read_all(store, digest, size)
        if len(body) != size or not digest_matches(digest, body):
            log.error("stored manifest does not match its digest", digest=digest)
            mismatch = StoreUnavailableError("content does not match digest")
            mismatch.__cause__ = ValueError("content does not match digest")
            raise _unavailable(ErrorCode.MANIFEST_UNKNOWN, digest, mismatch)
        media_type = detect_manifest_media_type(body)
        if media_type is None:
            self.cache.put_blob(digest, BlobFacts(size, False), generation)
            raise OciError(
                ErrorCode.MANIFEST_UNKNOWN,
                f"{digest} is not a manifest or index (fetch it from /blobs/)",
                detail={"digest": digest},
            )
        manifest = Manifest(digest, body, media_type)
        self.cache.put_manifest(manifest, generation)
        return manifest

    # --- blobs -------------------------------------------------------------------------------

    async def blob(self, digest: str) -> Blob:
        """Blob `digest` (never a manifest or index) with its size and local file, if any."""
        facts = self.cache.blob(digest)
        store = self._store(ErrorCode.BLOB_UNKNOWN, digest)
        if facts is None:
            facts = await self._load_blob_facts(store, digest)
        if facts.is_manifest:
            raise OciError(
                ErrorCode.BLOB_UNKNOWN,
                f"{digest} is a manifest or index (fetch it from /manifests/)",
                detail={"digest": digest},
            )
        return Blob(digest, facts.size, store.local_path(digest))

    async def _load_blob_facts(self, store: ContentStore, digest: str) -> BlobFacts:
        generation = self.cache.generation
        missing = OciError(
            ErrorCode.BLOB_UNKNOWN, f"no blob {digest} on this node", detail={"digest": digest}
        )
        with _store_errors(missing, "looking a blob up", digest):
            size = await store.stat(digest)
            is_manifest = False
            if 0 < size <= MAX_MANIFEST_BYTES:
                head = await self._read_all(store, digest, min(size, SNIFF_BYTES))
                if _looks_like_json_object(head):
                    body = (
                        head if size <= SNIFF_BYTES else await self._read_all(store, digest, size)
                    )
                    is_manifest = detect_manifest_media_type(body) is not None
        facts = BlobFacts(size, is_manifest)
        self.cache.put_blob(digest, facts, generation)
        return facts
