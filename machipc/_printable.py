"""``printable``: text a sender controls, made safe for one log line or terminal row.

Executable paths, exception texts and other strings that reach a log line or
the CLI's output can be chosen by a peer (a file name may hold a newline or an
escape sequence). They are shown with every control or line-breaking character
escaped, so a peer can neither forge a log line nor drive the terminal.
"""

from __future__ import annotations

import re

__all__ = ["printable"]

# C0 controls, DEL, C1 controls, and the Unicode line/paragraph separators;
# backslash too, so an escaped form cannot be confused with a literal one.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\\]")


def _escape(m: re.Match) -> str:
    c = m.group()
    if c == "\\":
        return "\\\\"
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with control characters, line separators and backslashes escaped (``\\x0a``, ``\\\\``).

    Undecodable bytes (``surrogateescape``) come out as ``\\udcXX``.
    """
    text = _UNSAFE.sub(_escape, text)
    if not text.isprintable() and any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        text = "".join(f"\\u{ord(c):04x}" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
    return text
