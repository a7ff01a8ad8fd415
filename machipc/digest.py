"""SHA-256 of a sender's executable, bounded in bytes read and cached by file identity.

``Allowlist(sha256=...)`` hashes the file a sender runs, on the receive
thread. Unbounded, a sender chose the cost: a sparse 4 GiB executable (no
disk used) took the server 5-16 s per message and made trusted requests time
out (issue 12 item 4, audit F8). So:

* a file over ``max_bytes`` (default :data:`MAX_HASH_BYTES`, 64 MiB, about
  0.05-0.2 s of hashing) is never read: :class:`TooLarge`;
* when the allowed files' sizes are known (``sizes``), a file of any other
  size is never read either (:class:`SizeMismatch`): it cannot have an
  allowed digest, and an attacker can only make the server read files
  exactly as large as the trusted ones;
* digests are cached by what changes when a file is rewritten, ``(st_dev,
  st_ino, st_size, st_mtime_ns, st_ctime_ns)`` (:data:`CACHE_SIZE` entries,
  least recently used dropped first), so each version of a file is read once
  however many processes run it.

What is left: a sender that makes a new version of a file (``touch``) before
each new process costs the server one read of up to ``max_bytes`` per process.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from typing import Optional

__all__ = ["MAX_HASH_BYTES", "CACHE_SIZE", "TooLarge", "SizeMismatch", "sha256_of_fd"]

#: Default largest file hashed (bytes).
MAX_HASH_BYTES = 64 * 1024 * 1024
#: File versions whose digest is remembered.
CACHE_SIZE = 256
_CHUNK = 1 << 20

_cache: "OrderedDict[tuple, str]" = OrderedDict()
_lock = threading.Lock()


class TooLarge(Exception):
    """The file is larger than the hashing limit; it was not read."""


class SizeMismatch(Exception):
    """The file's size is none of the allowed files' sizes; it was not read."""


def sha256_of_fd(fd: int, st: os.stat_result, max_bytes: int = MAX_HASH_BYTES, sizes: Optional[frozenset] = None) -> str:
    """Hex SHA-256 of the regular file open as ``fd`` whose ``fstat`` is ``st``.

    Reads at most ``st.st_size`` bytes, and only when the size is at most
    ``max_bytes`` and (if ``sizes`` is given) one of ``sizes``; raises
    TooLarge / SizeMismatch otherwise, and OSError from ``read``.
    """
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _lock:
        digest = _cache.get(key)
        if digest is not None:
            _cache.move_to_end(key)
            return digest
    if sizes is not None and st.st_size not in sizes:
        raise SizeMismatch(f"its size ({st.st_size} bytes) is none of the allowed files' sizes")
    if st.st_size > max_bytes:
        raise TooLarge(f"it is {st.st_size} bytes, over the {max_bytes}-byte hashing limit")
    h = hashlib.sha256()
    left = st.st_size
    while left > 0:
        chunk = os.read(fd, min(_CHUNK, left))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    if os.read(fd, 1):  # grew since the fstat: that is not the file the key names
        raise OSError("the file changed while it was being hashed")
    digest = h.hexdigest()
    with _lock:
        _cache[key] = digest
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return digest
