"""Just enough of the protobuf wire format to walk a large file without loading it.

A message is a sequence of fields, each a varint tag (field number << 3 | wire type) and a value. Length-delimited
values (wire type 2) carry their size up front, so a reader can step over a 1 GiB NEFF by reading ten bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5
_WINDOW = 64 * 1024


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message (corrupt or truncated)."""


def encode_varint(value: int) -> bytes:
    """Encode an unsigned varint; negative int64 values take the ten-byte two's complement form."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Return (value, position after it) for the varint at ``pos`` of ``buf``."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than ten bytes")


def as_int64(value: int) -> int:
    """Reinterpret a decoded varint as a signed int64."""
    return value - (1 << 64) if value >= 1 << 63 else value


def encode_tag(field: int, wire_type: int) -> bytes:
    return encode_varint(field << 3 | wire_type)


def length_delimited(field: int, payload: bytes) -> bytes:
    """A whole length-delimited field: tag, length and payload."""
    return encode_tag(field, LENGTH_DELIMITED) + encode_varint(len(payload)) + payload


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a message, located in the file: ``start`` is the tag, ``value_start`` the payload."""

    number: int
    wire_type: int
    start: int
    value_start: int
    end: int

    @property
    def value_length(self) -> int:
        return self.end - self.value_start


class FileReader:
    """Positional reads through a small window, so walking headers costs few system calls and little memory."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._window = b""
        self._window_start = 0

    def read(self, offset: int, length: int) -> bytes:
        """Bytes at [offset, offset + length), possibly fewer at the end of the file."""
        rel = offset - self._window_start
        if rel >= 0 and rel + length <= len(self._window):
            return self._window[rel : rel + length]
        self._window = os.pread(self.fd, max(length, _WINDOW), offset)
        self._window_start = offset
        return self._window[:length]

    def varint(self, offset: int, limit: int) -> tuple[int, int]:
        buf = self.read(offset, min(10, limit - offset))
        value, used = decode_varint(buf, 0)
        return value, offset + used

    def fields(self, start: int, end: int) -> Iterator[Field]:
        """Iterate the fields of the message occupying [start, end) without reading their payloads."""
        pos = start
        while pos < end:
            tag, value_start = self.varint(pos, end)
            number, wire_type = tag >> 3, tag & 7
            if number == 0:
                raise WireError(f"field number 0 at byte {pos}")
            if wire_type == VARINT:
                _, field_end = self.varint(value_start, end)
            elif wire_type == LENGTH_DELIMITED:
                length, value_start = self.varint(value_start, end)
                field_end = value_start + length
            elif wire_type == FIXED64:
                field_end = value_start + 8
            elif wire_type == FIXED32:
                field_end = value_start + 4
            else:
                raise WireError(f"unsupported wire type {wire_type} at byte {pos}")
            if field_end > end:
                raise WireError(f"field {number} at byte {pos} runs past the end of its message")
            yield Field(number, wire_type, pos, value_start, field_end)
            pos = field_end

    def payload(self, field: Field) -> bytes:
        return self.read(field.value_start, field.value_length)
