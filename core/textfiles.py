"""Reading the text files a user hands in (prompts, manifests, captions): one reader, one set of errors.

Files are decoded as UTF-8 (a byte-order mark is dropped); anything else is refused with one
line naming the file, the first bad byte and its line, instead of being decoded with
replacement characters that would silently change prompts or file names.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError


def decode_utf8(raw: bytes, name: str, hint: str = "save it as UTF-8") -> str:
    """``raw`` as text; InputError ``"{name} is not UTF-8 text (byte 0x.. on line N); {hint}"`` otherwise."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"{name} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); {hint}") from None


def read_utf8(path: str | Path, what: str, folder_hint: str, hint: str = "save it as UTF-8") -> str:
    """The text of the file at ``path``, a ``what`` ("prompts file", ...), with one-line errors for a
    missing file, a folder (``folder_hint`` says what to pass instead) and bytes that are not UTF-8."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such {what}")
    if not path.is_file():
        raise InputError(f"{path} is a folder; {folder_hint}")
    try:
        raw = path.read_bytes()
    except PermissionError:
        raise InputError(f"{path}: permission denied; make the {what} readable") from None
    return decode_utf8(raw, str(path), hint)
