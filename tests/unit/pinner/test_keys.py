"""Pure key tracking: manifest parsing, image walks, the keys an image gives, the key index."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.k3s.mirror_policy import Policy
from services.common.k3s.registries import parse_registries
from services.common.oci.document import manifest_children
from services.common.oci.media_types import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_TAR_GZIP,
    OCI_MANIFEST,
)
from services.common.store.protocol import Descriptor
from services.pinner.image_graph import digests_to_read, walk_image
from services.pinner.keys import (
    ImageKeys,
    KeyDelta,
    KeyIndex,
    KeyPolicy,
    diff,
    image_key_set,
)


def dg(n: int) -> str:
    return f"sha256:{n:064x}"


def desc(n: int, media_type: str = OCI_LAYER_TAR_GZIP) -> Descriptor:
    return Descriptor(digest=dg(n), size=n, media_type=media_type)


def desc_json(d: Descriptor) -> dict[str, object]:
    return {"mediaType": d.media_type, "digest": d.digest, "size": d.size}


def manifest_body(config: Descriptor, layers: list[Descriptor], media: str = OCI_MANIFEST) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media,
            "config": desc_json(config),
            "layers": [desc_json(x) for x in layers],
        }
    ).encode()


def index_body(manifests: list[Descriptor], media: str | None = OCI_INDEX) -> bytes:
    doc: dict[str, object] = {"schemaVersion": 2, "manifests": [desc_json(m) for m in manifests]}
    if media is not None:
        doc["mediaType"] = media
    return json.dumps(doc).encode()


# --- manifests ---------------------------------------------------------------------------------


def test_manifest_children_of_an_image_manifest_are_config_then_layers() -> None:
    body = manifest_body(desc(1, OCI_CONFIG), [desc(2), desc(3)])
    assert manifest_children(body, OCI_MANIFEST) == (desc(1, OCI_CONFIG), desc(2), desc(3))


def test_manifest_children_of_an_index_are_its_manifests() -> None:
    body = index_body([desc(4, OCI_MANIFEST), desc(5, OCI_MANIFEST)])
    assert manifest_children(body, OCI_INDEX) == (desc(4, OCI_MANIFEST), desc(5, OCI_MANIFEST))


def test_docker_manifest_list_and_manifest_are_understood() -> None:
    body = index_body([desc(4, DOCKER_MANIFEST)], DOCKER_MANIFEST_LIST)
    assert manifest_children(body, DOCKER_MANIFEST_LIST) == (desc(4, DOCKER_MANIFEST),)
    body = manifest_body(desc(1), [desc(2)], DOCKER_MANIFEST)
    assert [d.digest for d in manifest_children(body, DOCKER_MANIFEST)] == [dg(1), dg(2)]


def test_media_type_missing_in_parent_is_taken_from_the_document_shape() -> None:
    # An OCI index without mediaType, reached through a descriptor that names no type either.
    body = index_body([desc(4, OCI_MANIFEST)], media=None)
    assert manifest_children(body, "") == (desc(4, OCI_MANIFEST),)


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[]", b'{"schemaVersion": 1}', b'{"layers": "x", "config": 3}'],
)
def test_unparsable_or_foreign_documents_have_no_children(body: bytes) -> None:
    assert manifest_children(body, "") == ()


def test_descriptors_with_bad_digests_are_skipped() -> None:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"digest": "nonsense", "size": 1},
            "layers": [{"digest": dg(7), "size": True}, "x"],
        }
    ).encode()
    assert manifest_children(body, OCI_MANIFEST) == (Descriptor(dg(7), 0, ""),)


# --- walking -----------------------------------------------------------------------------------

INDEX = desc(100, OCI_INDEX)
AMD64 = desc(10, OCI_MANIFEST)
ARM64 = desc(20, OCI_MANIFEST)
GRAPH: dict[str, tuple[Descriptor, ...]] = {
    INDEX.digest: (AMD64, ARM64),
    AMD64.digest: (desc(11, OCI_CONFIG), desc(12), desc(13)),
    ARM64.digest: (desc(21, OCI_CONFIG), desc(22), desc(13)),
}
ALL = {dg(n) for n in (100, 10, 11, 12, 13, 20, 21, 22)}


def children(d: Descriptor) -> tuple[Descriptor, ...] | None:
    return GRAPH.get(d.digest)


def test_walk_reaches_every_present_digest_once() -> None:
    assert walk_image(INDEX, children, ALL) == frozenset(ALL)


def test_walk_keeps_only_present_digests_and_absent_manifests_hide_their_children() -> None:
    # One platform pulled: the arm64 manifest is absent, so its config and layers are not
    # reached even if (as in another image) they happen to be present.
    present = ALL - {dg(20)}
    assert walk_image(INDEX, children, present) == frozenset(
        {dg(100), dg(10), dg(11), dg(12), dg(13)}
    )
    # A missing layer is simply not counted.
    assert walk_image(INDEX, children, ALL - {dg(12)}) == frozenset(ALL - {dg(12)})


def test_walk_of_an_absent_target_is_empty() -> None:
    assert walk_image(INDEX, children, ALL - {dg(100)}) == frozenset()


def test_walk_survives_cycles() -> None:
    a, b = desc(1, OCI_INDEX), desc(2, OCI_INDEX)
    graph = {a.digest: (b,), b.digest: (a,)}
    assert walk_image(a, lambda d: graph.get(d.digest), {a.digest, b.digest}) == {
        a.digest,
        b.digest,
    }


def test_leaf_media_types_are_never_asked_for_children() -> None:
    asked: list[str] = []

    def spy(d: Descriptor) -> tuple[Descriptor, ...] | None:
        asked.append(d.digest)
        return children(d)

    walk_image(INDEX, spy, ALL)
    assert sorted(asked) == sorted([dg(100), dg(10), dg(20)])


def test_digests_to_read_goes_one_level_deeper_each_round() -> None:
    known: dict[str, tuple[Descriptor, ...]] = {}
    assert digests_to_read(INDEX, known, ALL) == [INDEX]
    known[INDEX.digest] = GRAPH[INDEX.digest]
    assert sorted(d.digest for d in digests_to_read(INDEX, known, ALL)) == [dg(10), dg(20)]
    known.update(GRAPH)
    assert digests_to_read(INDEX, known, ALL) == []
    # Absent manifests are never read.
    assert digests_to_read(INDEX, {INDEX.digest: GRAPH[INDEX.digest]}, ALL - {dg(20)}) == [AMD64]


# --- which keys ----------------------------------------------------------------------------------


def key_policy(
    yaml_text: str, *, allow_latest: bool = False, filters: tuple[str, ...] = ()
) -> KeyPolicy:
    registries = parse_registries(yaml_text)
    policy = Policy(registries.is_mirrored, allow_latest=allow_latest, filters=filters)
    return KeyPolicy(policy, mirrors_anything=bool(registries.mirrors))


DOCKER_ONLY = "mirrors:\n  docker.io: {}\n"


def test_tagged_image_of_a_mirrored_registry_gives_digests_and_tag() -> None:
    policy = key_policy(DOCKER_ONLY)
    assert policy.image_keys("docker.io/library/nginx:1.25") == ImageKeys(
        digests=True, tag_key="docker.io/library/nginx:1.25"
    )


def test_digest_reference_gives_digests_only() -> None:
    policy = key_policy(DOCKER_ONLY)
    assert policy.image_keys(f"docker.io/library/nginx@{dg(1)}") == ImageKeys(digests=True)
    assert policy.image_keys(f"docker.io/library/nginx:1@{dg(1)}") == ImageKeys(digests=True)


@pytest.mark.parametrize(
    "name",
    [
        "quay.io/org/app:1",  # registry not mirrored
        dg(5),  # CRI's image-id record
        "nginx:1.25",  # not fully qualified
        "library/nginx:1.25",
        "docker.io/Bad_Name:1",
        "",
    ],
)
def test_names_that_give_nothing(name: str) -> None:
    assert key_policy(DOCKER_ONLY).image_keys(name) == ImageKeys(digests=False)


def test_wildcard_mirrors_every_registry() -> None:
    policy = key_policy('mirrors:\n  "*": {}\n')
    assert policy.image_keys("quay.io/org/app:1").tag_key == "quay.io/org/app:1"
    assert policy.image_keys("127.0.0.1:5000/x:2").tag_key == "127.0.0.1:5000/x:2"


def test_latest_tag_is_not_advertised_unless_allowed_but_its_digests_are() -> None:
    assert key_policy(DOCKER_ONLY).image_keys("docker.io/library/a:latest") == ImageKeys(
        digests=True
    )
    allowed = key_policy(DOCKER_ONLY, allow_latest=True)
    assert allowed.image_keys("docker.io/library/a:latest").tag_key == "docker.io/library/a:latest"


def test_filters_gate_tags_only() -> None:
    policy = key_policy(DOCKER_ONLY, filters=(r"^docker\.io/library/keep:",))
    assert policy.image_keys("docker.io/library/keep:1").tag_key == "docker.io/library/keep:1"
    assert policy.image_keys("docker.io/library/other:1") == ImageKeys(digests=True)


def test_a_node_mirroring_nothing_gives_nothing() -> None:
    policy = key_policy("")
    assert not policy.mirrors_anything
    assert policy.image_keys("docker.io/library/nginx:1") == ImageKeys(digests=False)


def test_image_key_set() -> None:
    policy = key_policy(DOCKER_ONLY)
    name = "docker.io/library/a:1"
    assert image_key_set(name, [dg(1), dg(2)], policy) == {dg(1), dg(2), name}
    # Nothing present: not even the tag (the node could not serve it).
    assert image_key_set(name, [], policy) == frozenset()
    assert image_key_set("quay.io/a/b:1", [dg(1)], policy) == frozenset()


# --- the index -----------------------------------------------------------------------------------


def test_shared_digest_stays_while_any_holder_remains() -> None:
    index = KeyIndex()
    delta = index.set_image("a", {dg(1), dg(2), "r/a:1"})
    assert delta.added == {dg(1), dg(2), "r/a:1"} and not delta.removed
    delta = index.set_image("b", {dg(2), dg(3), "r/b:1"})
    assert delta.added == {dg(3), "r/b:1"}
    delta = index.remove_image("a")
    assert delta.removed == {dg(1), "r/a:1"} and not delta.added
    assert index.keys == {dg(2), dg(3), "r/b:1"}
    assert index.holders_of(dg(2)) == {"b"}
    delta = index.remove_image("b")
    assert delta.removed == {dg(2), dg(3), "r/b:1"}
    assert index.keys == frozenset() and dict(index.images) == {}


def test_set_image_reports_only_the_change() -> None:
    index = KeyIndex()
    index.set_image("a", {dg(1), dg(2)})
    delta = index.set_image("a", {dg(2), dg(3)})
    assert delta.added == {dg(3)} and delta.removed == {dg(1)}
    assert not index.set_image("a", {dg(2), dg(3)})


def test_replace_all_is_the_net_change() -> None:
    index = KeyIndex()
    index.set_image("a", {dg(1), dg(2)})
    index.set_image("b", {dg(2)})
    delta = index.replace_all({"b": {dg(2)}, "c": {dg(1), dg(4)}})
    # dg(1) moved from a to c: held throughout, so neither withdrawn nor re-advertised.
    assert delta.added == {dg(4)} and delta.removed == set()
    assert set(index.images) == {"b", "c"}


def test_diff_and_merge() -> None:
    delta = diff({"a", "b"}, {"b", "c"})
    assert delta.added == {"a"} and delta.removed == {"c"}
    delta.merge(KeyDelta(added={"c"}, removed={"a", "d"}))
    assert delta.added == set() and delta.removed == {"d"}


images_st = st.dictionaries(
    st.sampled_from("abcdef"), st.frozensets(st.integers(0, 12).map(dg), max_size=6), max_size=6
)


@given(st.lists(images_st, min_size=1, max_size=6))
def test_index_keys_always_equal_union_and_deltas_replay_to_it(
    states: list[dict[str, frozenset[str]]],
) -> None:
    index = KeyIndex()
    advertised: set[str] = set()
    for state in states:
        delta = index.replace_all(state)
        assert not (delta.added & delta.removed)
        advertised = (advertised - delta.removed) | delta.added
        union: set[str] = set().union(*state.values()) if state else set()
        assert index.keys == union == advertised
