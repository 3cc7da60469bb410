"""Source names in `names.txt`, one per line, lossless (format_version 2).

Names come from tar headers and file systems as bytes; bytes that are not UTF-8 reach Python as
the surrogates `surrogateescape` makes of them, and a name may hold a newline. names.txt stays
valid UTF-8 text with one name per line: a backslash is written `\\\\`, a byte that is not UTF-8
`\\xHH`, newline, carriage return and tab `\\n`, `\\r`, `\\t`, any other unprintable character
`\\uXXXX` (or `\\UXXXXXXXX`). Plain names are written as they are, so `grep` works on them, and
`escape_name` is also how a name is shown on a terminal (no control characters reach it).
format_version 1 wrote names raw, a newline as '?': those files are still read, as they were.
"""

from __future__ import annotations

import re

_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNNAMED = {value[1:]: key for key, value in _NAMED.items()}  # "n" -> "\n"
_ESCAPE = re.compile(r"\\(\\|n|r|t|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")


def _escape_char(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for the raw byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    if char.isprintable():
        return char
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def escape_name(name: str) -> str:
    """One line of printable text, from which `unescape_name` gives back `name` exactly."""
    if name.isprintable() and "\\" not in name:  # the common case: nothing to do
        return name
    return "".join(_escape_char(char) for char in name)


def _unescape(match: re.Match) -> str:
    code = match.group(1)
    if code in _UNNAMED:
        return _UNNAMED[code]
    if code[0] == "x":
        return chr(0xDC00 + int(code[1:], 16))
    return chr(int(code[1:], 16))


def unescape_name(text: str) -> str:
    return _ESCAPE.sub(_unescape, text) if "\\" in text else text


def names_line(name: str) -> bytes:
    """What names.txt holds for one record."""
    return (escape_name(name) + "\n").encode("utf-8")


def parse_names(data: bytes, format_version: int) -> list[str]:
    """names.txt's bytes -> one name per record. Raises UnicodeDecodeError on a damaged file."""
    if format_version == 1:  # raw names, non-UTF-8 bytes as they were
        return data.decode("utf-8", "surrogateescape").split("\n")[:-1]
    return [unescape_name(line) for line in data.decode("utf-8").split("\n")[:-1]]
