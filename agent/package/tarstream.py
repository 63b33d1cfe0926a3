"""A strict, streaming ustar reader and writer: one pass, bounded memory, no extraction logic."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from agent.errors import PackageError, UnsafePackageError

BLOCK = 512
CHUNK_BYTES = 1 << 20

TYPE_NAMES = {
    b"0": "regular file",
    b"\x00": "regular file",
    b"1": "hardlink",
    b"2": "symlink",
    b"3": "character device",
    b"4": "block device",
    b"5": "directory",
    b"6": "FIFO",
    b"7": "contiguous file",
    b"x": "pax extended header",
    b"g": "pax global header",
    b"L": "GNU long name",
    b"K": "GNU long link name",
}
REGULAR_TYPES = (b"0", b"\x00")


@dataclass(frozen=True)
class Member:
    """One tar header: the raw name, type flag, data size and where its header started."""

    name: str
    typeflag: bytes
    size: int
    offset: int

    @property
    def kind(self) -> str:
        return TYPE_NAMES.get(self.typeflag, f"type {self.typeflag!r}")

    @property
    def is_regular(self) -> bool:
        return self.typeflag in REGULAR_TYPES


def _octal(field: bytes, what: str, offset: int) -> int:
    text = field.split(b"\x00", 1)[0].strip(b" ")
    if field[:1] and field[0] & 0x80 and what == "size":
        # GNU base-256 numbers only appear for sizes over 8 GiB; no package is that big.
        raise UnsafePackageError(f"tar header at byte {offset}: base-256 {what} is refused")
    if not text:
        return 0
    if any(c not in b"01234567" for c in text):
        raise PackageError(f"not a tar archive: bad {what} field at byte {offset}")
    return int(text, 8)


class TarReader:
    """Reads members of an uncompressed ustar archive strictly in order, never seeking.

    ``max_bytes`` bounds everything read, whatever the headers claim.
    """

    def __init__(self, fh: BinaryIO, max_bytes: int):
        self.fh = fh
        self.max_bytes = max_bytes
        self.pos = 0
        self._pending = 0  # unread data + padding of the current member
        self._buf = bytearray(CHUNK_BYTES)
        self._view = memoryview(self._buf)
        self.ended = False

    def _read_exact(self, n: int) -> bytes:
        if self.pos + n > self.max_bytes:
            raise UnsafePackageError(f"package is larger than the {self.max_bytes} bytes allowed")
        data = self.fh.read(n)
        if len(data) != n:
            raise PackageError(f"truncated package: archive ends at byte {self.pos + len(data)}")
        self.pos += n
        return data

    def _skip(self, n: int) -> None:
        while n > 0:
            step = min(n, CHUNK_BYTES)
            self._read_exact(step)
            n -= step

    def next(self) -> Member | None:
        """The next member header, or None at the end-of-archive marker."""
        if self.ended:
            return None
        self._skip(self._pending)
        self._pending = 0
        offset = self.pos
        if offset + BLOCK > self.max_bytes:
            raise UnsafePackageError(f"package is larger than the {self.max_bytes} bytes allowed")
        header = self.fh.read(BLOCK)
        if len(header) == 0 and offset == 0:
            raise PackageError("not a tar archive: the file is empty")
        if len(header) != BLOCK:
            raise PackageError(f"truncated package: no end-of-archive marker (byte {offset})")
        self.pos += BLOCK
        if header == bytes(BLOCK):
            self.ended = True
            return None
        stored = _octal(header[148:156], "checksum", offset)
        blanked = header[:148] + b" " * 8 + header[156:]
        unsigned = sum(blanked)
        signed = sum(b - 256 if b > 127 else b for b in blanked)
        if stored not in (unsigned, signed):
            raise PackageError(f"not a tar archive: bad header checksum at byte {offset}")
        magic = header[257:263]
        if magic not in (b"ustar\x00", b"ustar "):
            raise PackageError(f"not a ustar archive: unknown header format at byte {offset}")
        raw_name = header[0:100].split(b"\x00", 1)[0]
        if magic == b"ustar\x00":
            prefix = header[345:500].split(b"\x00", 1)[0]
            if prefix:
                raw_name = prefix + b"/" + raw_name
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise UnsafePackageError(f"tar member at byte {offset}: name is not UTF-8") from None
        size = _octal(header[124:136], "size", offset)
        typeflag = header[156:157]
        if typeflag not in REGULAR_TYPES:
            size_carried = size if typeflag not in (b"1", b"2", b"3", b"4", b"5", b"6") else 0
        else:
            size_carried = size
        self._pending = _padded(size_carried)
        return Member(name=name, typeflag=typeflag, size=size_carried, offset=offset)

    def stream_data(self, member: Member, sink: Callable[[memoryview], None]) -> None:
        """Feed the member's data to ``sink`` in chunks, then consume its padding."""
        remaining = member.size
        if self.pos + _padded(remaining) > self.max_bytes:
            raise UnsafePackageError(f"package is larger than the {self.max_bytes} bytes allowed")
        while remaining > 0:
            want = min(remaining, CHUNK_BYTES)
            got = self.fh.readinto(self._view[:want])  # type: ignore[attr-defined]
            if not got:
                raise PackageError(
                    f"truncated package: {member.name} ends early at byte {self.pos}"
                )
            self.pos += got
            remaining -= got
            sink(self._view[:got])
        pad = _padded(member.size) - member.size
        self._pending = 0
        if pad:
            self._read_exact(pad)

    def read_data(self, member: Member) -> bytes:
        parts: list[bytes] = []
        self.stream_data(member, lambda chunk: parts.append(bytes(chunk)))
        return b"".join(parts)

    def check_trailer(self, total_bytes: int | None) -> None:
        """After the end marker only zero blocks may follow (tar pads to 10 KiB records)."""
        rest = self.fh.read(20 * BLOCK + 1)
        if len(rest) > 20 * BLOCK or rest.strip(b"\x00"):
            raise UnsafePackageError(f"data after the end of the archive (byte {self.pos})")
        self.pos += len(rest)
        if total_bytes is not None and self.pos != total_bytes:  # pragma: no cover - growing file
            raise UnsafePackageError("package file changed while it was read")


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def tar_header(name: str, size: int, typeflag: bytes = b"0", mode: int = 0o644, mtime: int = 0,
               linkname: str = "") -> bytes:  # fmt: skip
    """A POSIX ustar header block (the builder's only format; names up to 100 bytes)."""
    raw = name.encode("utf-8")
    prefix = b""
    if len(raw) > 100:
        cut = raw.rfind(b"/", 0, 156)
        if cut <= 0 or len(raw) - cut - 1 > 100:
            raise UnsafePackageError(f"{name}: path too long for a ustar header")
        prefix, raw = raw[:cut], raw[cut + 1 :]
    header = bytearray(BLOCK)
    header[0 : len(raw)] = raw
    header[100:108] = b"%07o\x00" % mode
    header[108:116] = b"0000000\x00"
    header[116:124] = b"0000000\x00"
    header[124:136] = b"%011o\x00" % size
    header[136:148] = b"%011o\x00" % mtime
    header[148:156] = b" " * 8
    header[156:157] = typeflag
    link = linkname.encode()
    header[157 : 157 + len(link)] = link
    header[257:263] = b"ustar\x00"
    header[263:265] = b"00"
    header[345 : 345 + len(prefix)] = prefix
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header)


def padding(size: int) -> bytes:
    return bytes(_padded(size) - size)


END_OF_ARCHIVE = bytes(2 * BLOCK)
