"""machipc.digest: hashing a sender's executable is bounded (issue 12 item 4, audit F8)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import threading

import pytest

import machipc
from machipc import digest
from machipc.policies import Allowlist
from machipc import wire
from machipc.wire import ErrorCode, Kind


def _file(tmp_path, name: str, data: bytes) -> str:
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _hash(path: str, **kw) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return digest.sha256_of_fd(fd, os.fstat(fd), **kw)
    finally:
        os.close(fd)


def test_sha256_of_fd_hashes_and_caches_by_file_version(tmp_path):
    path = _file(tmp_path, "a", b"hello" * 1000)
    assert _hash(path) == hashlib.sha256(b"hello" * 1000).hexdigest()
    st = os.stat(path)
    with open(os.devnull, "rb") as null:  # same version: answered from the cache, /dev/null is never read
        assert digest.sha256_of_fd(null.fileno(), st) == hashlib.sha256(b"hello" * 1000).hexdigest()
    with open(path, "ab") as f:
        f.write(b"!")  # a new version: hashed again
    assert _hash(path) == hashlib.sha256(b"hello" * 1000 + b"!").hexdigest()


def test_sha256_of_fd_refuses_large_and_mismatched_files_unread(tmp_path):
    path = _file(tmp_path, "big", b"")
    os.truncate(path, 1 << 40)  # 1 TiB, sparse
    with pytest.raises(digest.TooLarge):
        _hash(path)
    small = _file(tmp_path, "small", b"x" * 100)
    with pytest.raises(digest.SizeMismatch):
        _hash(small, sizes=frozenset({99, 101}))
    assert _hash(small, sizes=frozenset({100})) == hashlib.sha256(b"x" * 100).hexdigest()
    with pytest.raises(digest.TooLarge):
        _hash(_file(tmp_path, "c", b"y" * 100), max_bytes=99)


def test_allowlist_for_files_knows_sizes(tmp_path):
    path = _file(tmp_path, "tool", b"#!/bin/sh\n")
    policy = Allowlist.for_files([path])
    assert policy.sha256 == {hashlib.sha256(b"#!/bin/sh\n").hexdigest()}
    assert policy.sha256_sizes == {10}
    with pytest.raises(ValueError):
        Allowlist(sha256=["0" * 64], max_hash_bytes=-1)


ATTACKER_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
int main(int argc, char **argv) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    /* one REQUEST (kind 2), id 1, 1-byte payload, by docs/protocol.md; argv[2]: the version */
    unsigned char pkt[25] = {0x6d, 0x69, 0, 2, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 'x'};
    unsigned char reply[256];
    ssize_t n;
    int s = socket(AF_UNIX, SOCK_SEQPACKET, 0);
    pkt[2] = (unsigned char)atoi(argv[2]);
    strncpy(a.sun_path, argv[1], sizeof(a.sun_path) - 1);
    if (connect(s, (struct sockaddr *)&a, sizeof(a)) < 0 || send(s, pkt, sizeof(pkt), 0) < 0) return 2;
    do  /* skip the server's HELLO (kind 5) */
        n = recv(s, reply, sizeof(reply), 0);
    while (n >= 4 && reply[3] == 5);
    printf("%d %d\n", n >= 4 ? reply[3] : -1, n >= 26 ? reply[24] | reply[25] << 8 : -1);
    return 0;
}
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("cc"), reason="needs root, setpriv and cc")
def test_sparse_huge_executable_is_refused_unread(impl, sockdir):
    """A 4 GiB sparse executable as uid 65534 vs "root, or that file": refused fast, root served meanwhile."""
    exedir = tempfile.mkdtemp(prefix="mi-exe-")
    try:
        os.chmod(exedir, 0o755)
        os.chmod(sockdir, 0o755)
        src = os.path.join(exedir, "attacker.c")
        with open(src, "w") as f:
            f.write(ATTACKER_C)
        exe = os.path.join(exedir, "attacker")
        subprocess.run(["cc", "-O2", "-o", exe, src], check=True)
        os.truncate(exe, 4 << 30)  # the ELF loader ignores the sparse tail
        os.chmod(exe, 0o755)
        with open("/bin/true", "rb") as f:
            allowed = hashlib.sha256(f.read()).hexdigest()
        policy = Allowlist(uids=[0]) | Allowlist(sha256=[allowed])
        srv = machipc.Server("org.test.sparse", policy, directory=sockdir, impl=impl)
        thread = threading.Thread(target=srv.serve, args=(lambda m: b"ok",), daemon=True)
        thread.start()
        answers, trusted, done = [], [], threading.Event()

        def attack() -> None:
            try:
                for _ in range(3):
                    os.utime(exe)  # a new file version each time: the digest cache cannot help
                    out = subprocess.run(
                        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", exe, srv.path, str(wire.VERSION)],
                        capture_output=True, text=True, timeout=120,
                    ).stdout.split()
                    answers.append(tuple(map(int, out)))
            finally:
                done.set()

        attacker = threading.Thread(target=attack)
        try:
            with machipc.Client("org.test.sparse", directory=sockdir, impl=impl, timeout=3) as cli:
                attacker.start()
                while not done.is_set():
                    trusted.append(cli.request(b"t"))  # IPCTimeoutError here fails the test
            attacker.join()
        finally:
            srv.close()
            thread.join(10)
        print(f"attacker answers {answers}; trusted requests meanwhile: {len(trusted)}")
        assert answers == [(Kind.ERROR, ErrorCode.REJECTED)] * 3
        assert trusted and set(trusted) == {b"ok"}
        assert srv.stats.rejected == 3
    finally:
        shutil.rmtree(exedir, ignore_errors=True)
