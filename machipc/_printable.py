"""``printable``: text a sender controls, made safe for one log line or terminal row.

Executable paths, exception texts and other strings that reach a log line or
the CLI's output can be chosen by a peer (a file name may hold a newline or an
escape sequence). They are shown with every control or line-breaking character
escaped, so a peer can neither forge a log line nor drive the terminal.
"""

from __future__ import annotations

import re

__all__ = ["printable"]

# C0 controls, DEL, C1 controls, the Unicode line/paragraph separators, and lone
# surrogates (undecodable bytes of a surrogateescape'd file name). Backslashes
# stay as they are, so escaping twice (a reason built from escaped parts, escaped again
# where it is logged) changes nothing.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _escape(m: re.Match) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with control characters and line separators escaped (``\\x0a``); idempotent.

    Undecodable bytes (``surrogateescape``) come out as ``\\udcXX``.
    """
    return _UNSAFE.sub(_escape, text)
