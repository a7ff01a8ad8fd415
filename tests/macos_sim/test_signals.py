"""Finding 4: SIGTERM / SIGINT stop a serve() blocked in mach_msg.

libsyscall's mach_msg restarts an interrupted receive itself unless
MACH_RCV_INTERRUPT is passed, so no Python handler runs; the fake kernel
models that by holding the signals while a receive without the option waits
(fakekernel.Kernel._wait). The child blocks in receive before it is signalled.
"""

import signal

import pytest

from tests.macos_sim.sim_child import spawn

SERVE = """
    import sys, threading, time
    import machipc
    from machipc import _mach
    srv = machipc.Server("org.machipc.sim.sig")

    def client():
        with machipc.Client("org.machipc.sim.sig", timeout=30) as cli:
            assert cli.request(b"x") == b"ok"
        while _mach.KERNEL.blocked == 0:  # serve() is back inside mach_msg(receive)
            time.sleep(0.01)
        print("blocked", flush=True)

    threading.Thread(target=client, daemon=True).start()
    srv.serve(lambda m: b"ok")
    print("stopped", flush=True)
    srv.close()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_blocked_serve(signum):
    p = spawn(SERVE)
    try:
        assert p.stdout.readline().strip() == "blocked", p.stderr.read()
        p.send_signal(signum)
        out, err = p.communicate(timeout=60)
    except Exception:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"serve() did not stop on signal {signum} (blocked in mach_msg): {err[-2000:]}")
    assert "stopped" in out and p.returncode == 0, err[-2000:]


def test_interrupted_send_is_retried_without_leaking_its_reply_right(monkeypatch):
    """MACH_SEND_INTERRUPTED (machmsg.SendInterrupted): the handlers ran in _mach.send;
    Conn.send tries again for the time left with a fresh reply port, the first one
    destroyed (PEP 475)."""
    from machipc import _mach, mach
    from machipc import machmsg as mm
    from machipc.wire import Kind

    server = mach.server_transport("org.machipc.sim.sendintr")
    client = mach.client_conn("org.machipc.sim.sendintr", 5.0)
    try:
        real, calls = _mach.send, []

        def interrupted_once(*a, **k):
            calls.append(a[2])  # the reply port
            if len(calls) == 1:
                raise mm.send_error(mm.MACH_SEND_INTERRUPTED, 5.0)
            return real(*a, **k)

        before = _mach.KERNEL.self_task.port_names()
        monkeypatch.setattr(_mach, "send", interrupted_once)
        client.send(Kind.REQUEST, 1, b"x", 5.0)
        assert len(calls) == 2 and calls[0] != calls[1]
        assert server.recv(0).request_id == 1
        assert _mach.KERNEL.self_task.port_names() == before + 1  # only the reply port in use
    finally:
        client.close()
        server.close()
