"""Hypothesis strategies for any protobuf message, built by walking its descriptor."""

from __future__ import annotations

from typing import Any, cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

# Deep enough for every request we define (a request holds at most Duration/SenderInfo).
MAX_DEPTH = 3
MAX_REPEATED = 6

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

# Values near what the services expect (digests, references, 32-byte IDs), so generation
# reaches past the first validation step as well as exercising it.
_INTERESTING_TEXT = [
    "",
    "docker.io/library/fuzz:1.0",
    "docker.io/library/fuzz@sha256:" + "a" * 64,
    "sha256:" + "0" * 64,
    "sha256:xyz",
    "../../etc/passwd",
    "\x00",
    "é" * 10,
    "x" * 2000,
]


def _int_strategy(low: int, high: int) -> st.SearchStrategy[int]:
    return st.one_of(
        # Ports and counts the services use, so requests get past validation too.
        st.sampled_from(sorted({0, 1, low, high, min(high, 32), min(high, 5001), max(low, -1)})),
        st.integers(low, high),
    )


def _message_type(field: FieldDescriptor) -> Descriptor:
    assert field.message_type is not None, field.full_name
    return field.message_type


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and bool(
        _message_type(field).GetOptions().map_entry
    )


def _scalar(field: FieldDescriptor, extra_text: tuple[str, ...] = ()) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_RANGES:
        return _int_strategy(*_INT_RANGES[kind])
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if kind == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from([*_INTERESTING_TEXT, *extra_text]), st.text(max_size=40))
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=48))
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        # Proto3 enums are open: unknown numbers arrive too.
        return st.one_of(st.sampled_from(known), st.integers(-5, 100))
    raise TypeError(f"no strategy for field {field.full_name} of type {kind}")


def _field_value(
    field: FieldDescriptor, depth: int, extra_text: tuple[str, ...] = ()
) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        entry = _message_type(field)
        if _is_map(field):
            return st.dictionaries(
                _scalar(entry.fields_by_name["key"], extra_text),
                _field_value(entry.fields_by_name["value"], depth + 1, extra_text),
                max_size=MAX_REPEATED,
            )
        return message_dicts(entry, depth + 1, extra_text)
    return _scalar(field, extra_text)


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def message_dicts(
    descriptor: Descriptor, depth: int = 0, extra_text: tuple[str, ...] = ()
) -> st.SearchStrategy[dict[str, Any]]:
    """Field values of `descriptor` as a dict (a field is absent or set; repeated = a list);
    string fields also draw from `extra_text` (values a particular service under test knows)."""
    if depth >= MAX_DEPTH:
        return st.just({})
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        value = _field_value(field, depth, extra_text)
        if _is_repeated(field) and not _is_map(field):
            value = st.lists(value, max_size=MAX_REPEATED)
        fields[field.name] = value
    return st.fixed_dictionaries({}, optional=fields)


def _fill(message: Message, values: dict[str, Any]) -> None:
    descriptor = cast(Descriptor, message.DESCRIPTOR)
    for name, value in values.items():
        field = descriptor.fields_by_name[name]
        target = getattr(message, name)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if _is_map(field):
                value_field = _message_type(field).fields_by_name["value"]
                for key, item in value.items():
                    if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                        _fill(target[key], item)
                    else:
                        target[key] = item
            elif _is_repeated(field):
                for item in value:
                    _fill(target.add(), item)
            else:
                target.SetInParent()
                _fill(target, value)
        elif _is_repeated(field):
            target.extend(value)
        else:
            setattr(message, name, value)


def messages(
    descriptor: Descriptor, extra_text: tuple[str, ...] = ()
) -> st.SearchStrategy[Message]:
    """Instances of the message class of `descriptor` with generated field values."""
    cls = GetMessageClass(descriptor)

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        _fill(message, values)
        return message

    return message_dicts(descriptor, extra_text=extra_text).map(build)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# Field numbers no request of ours uses: what an older or newer client might send.
_UNKNOWN_FIELD = st.integers(1000, 536_870_911)
_UNKNOWN_FIELDS = st.lists(
    st.one_of(
        st.tuples(_UNKNOWN_FIELD, st.integers(0, 2**64 - 1)).map(
            lambda t: _varint(t[0] << 3) + _varint(t[1])
        ),
        st.tuples(_UNKNOWN_FIELD, st.binary(max_size=40)).map(
            lambda t: _varint((t[0] << 3) | 2) + _varint(len(t[1])) + t[1]
        ),
    ),
    max_size=3,
).map(b"".join)


def wire_requests(
    descriptor: Descriptor, extra_text: tuple[str, ...] = ()
) -> st.SearchStrategy[bytes]:
    """Serialized `descriptor` messages, some with unknown fields appended (still valid wire
    format, so even a message without fields yields many distinct requests)."""
    return st.tuples(messages(descriptor, extra_text), _UNKNOWN_FIELDS).map(
        lambda t: t[0].SerializeToString() + t[1]
    )
