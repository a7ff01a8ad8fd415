"""``python -m machipc`` / ``machipc``: serve, send, request, demo."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from . import policies
from ._printable import printable
from .client import Client
from .errors import InvalidArgument, IPCError
from .message import Message
from .server import Server

POLICIES = {
    "same-user": policies.SameUser,
    "allow-all": policies.AllowAll,
}


def _describe(msg: Message) -> str:
    s = msg.sender
    kind = "request" if msg.expects_reply else "message"
    # The unit is what a SystemdUnit policy would name (on Linux; '?' elsewhere).
    # exe and unit are the sender's to choose (file and cgroup names): shown escaped.
    return f"{kind} from pid {s.pid} uid {s.uid} gid {s.gid} exe {printable(s.exe or '?')} unit {printable(s.unit or '?')}: {bytes(msg.data)!r}"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``machipc COMMAND: error: ...``, exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def cmd_serve(args: argparse.Namespace) -> int:
    policy = policies.load(args.policy_file) if args.policy_file else POLICIES[args.policy or "same-user"]()
    with Server(args.name, policy, enforce=not args.report_only, directory=args.directory) as srv:
        print(f"serving {args.name!r} at {srv.path} with {policy!r}; Ctrl-C to stop", flush=True)

        def handle(msg: Message) -> Optional[bytes]:
            print(_describe(msg), flush=True)
            return bytes(msg.data) if args.echo else b"ok"

        srv.serve(handle)
    return 0


def _payload(args: argparse.Namespace) -> bytes:
    """DATA as UTF-8, or the bytes of ``--file`` (``-``: standard input)."""
    if (args.data is None) == (args.file is None):
        raise InvalidArgument("give the payload as DATA or with --file (not both)")
    if args.file is None:
        return args.data.encode()
    if args.file == "-":
        return sys.stdin.buffer.read()
    with open(args.file, "rb") as f:
        return f.read()


def _client(args: argparse.Namespace) -> Client:
    server_policy = policies.load(args.server_policy_file) if args.server_policy_file else None
    return Client(args.name, timeout=args.timeout, directory=args.directory, server_policy=server_policy)


def cmd_send(args: argparse.Namespace) -> int:
    data = _payload(args)
    with _client(args) as cli:
        cli.send(data)
    return 0


def cmd_request(args: argparse.Namespace) -> int:
    data = _payload(args)
    with _client(args) as cli:
        reply = bytes(cli.request(data))
    if args.output == "-":
        sys.stdout.buffer.write(reply)
    elif args.output:
        with open(args.output, "wb") as f:
            f.write(reply)
    else:
        sys.stdout.write(reply.decode("utf-8", "backslashreplace") + "\n")
    return 0


def cmd_unit(args: argparse.Namespace) -> int:
    from .activation import client_unit_file, unit_files, write_units

    if args.client:
        files = client_unit_file(args.name, args.client, args.exec, user=args.user, unit=args.unit)
        then = f"systemctl daemon-reload && systemctl start {next(iter(files))}"
    else:
        files = unit_files(args.name, args.exec, path=args.path, mode=args.mode, user=args.user, unit=args.unit)
        then = f"systemctl daemon-reload && systemctl enable --now {args.unit or args.name}.socket"
    if args.output == "-":
        for filename, text in files.items():
            sys.stdout.write(f"# {filename}\n{text}\n")
        return 0
    for target in write_units(args.output, files, force=args.force):
        print(f"wrote {target}")
    print(f"then: {then}")
    if args.client:
        print(f'the daemon allows it with: SystemdUnit("{next(iter(files))}")')
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(clients=args.clients)


def cmd_plist(args: argparse.Namespace) -> int:
    from .launchd import plist_bytes, write_plist

    if args.output == "-":
        sys.stdout.buffer.write(plist_bytes(args.name, args.program, user_agent=args.user_agent))
        return 0
    print(write_plist(args.name, args.program, args.user_agent, args.output, force=args.force))
    return 0


def _octal(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="machipc",
        description="Kernel-authenticated local IPC: the kernel tells the server who sent each message.",
        epilog="Service names map to sockets: servers bind in $MACHIPC_RUNTIME_DIR, else /run/machipc "
        "(root), else $XDG_RUNTIME_DIR/machipc or /tmp/machipc-UID; clients look in $MACHIPC_RUNTIME_DIR "
        "alone, else in their own per-user directory, then in /run/machipc.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument("--version", action="version", version=f"machipc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("name", help="service name, e.g. org.example.echo")
        p.add_argument("--directory", help="socket directory (overrides the runtime-dir lookup)")

    p = sub.add_parser("serve", help="serve NAME, printing each message with its sender")
    common(p)
    who = p.add_mutually_exclusive_group()
    who.add_argument("--policy", choices=sorted(POLICIES), help="who may talk (default: same-user)")
    who.add_argument("--policy-file", metavar="TOML", help="load the policy from a TOML file (see docs/policies.md)")
    p.add_argument("--report-only", action="store_true", help="log what the policy would reject, but let it through")
    p.add_argument("--echo", action="store_true", help="answer requests with their own payload (default: b'ok')")
    p.set_defaults(func=cmd_serve)

    for name, func, what in (("send", cmd_send, "send a one-way message"), ("request", cmd_request, "send a request and print the reply")):
        p = sub.add_parser(name, help=f"{what} to NAME")
        common(p)
        p.add_argument("data", nargs="?", help="payload (UTF-8 text); or use --file")
        p.add_argument("-f", "--file", metavar="PATH", help="send the bytes of PATH instead (- for standard input)")
        p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
        if name == "request":
            p.add_argument("-o", "--output", metavar="PATH", help="write the reply's bytes to PATH (- for standard output) instead of printing it as text")
        p.add_argument(
            "--server-policy-file",
            metavar="TOML",
            help="which server to trust, as a policy file (default: root or your own uid; "
            "needed inside a container, where the server shows as pid 0 and the overflow uid)",
        )
        p.set_defaults(func=func)

    p = sub.add_parser(
        "unit",
        help="write NAME.socket and NAME.service for systemd socket activation, or with --client a client's service",
    )
    p.add_argument("name", help="service name, e.g. org.example.echo")
    p.add_argument("--exec", required=True, help="the daemon's (or with --client, the client's) command line (ExecStart=)")
    p.add_argument(
        "--client",
        metavar="UNIT",
        help="write UNIT.service for a client of NAME instead; the daemon's SystemdUnit policy names UNIT.service",
    )
    p.add_argument("--path", help="socket path (default /run/machipc/NAME, or $MACHIPC_RUNTIME_DIR/NAME)")
    p.add_argument("--mode", type=_octal, default=0o666, help="SocketMode= in octal (default 0666: the policy is the gate)")
    p.add_argument("--user", help="User= to run the daemon (or client) as")
    p.add_argument("--unit", help="unit file base name (default NAME)")
    p.add_argument("--output", "-o", default=".", help="directory to write to, or - for stdout (default .)")
    p.add_argument("--force", action="store_true", help="overwrite existing unit files")
    p.set_defaults(func=cmd_unit)

    p = sub.add_parser("demo", help="run a server and client processes; shows accepted and rejected senders")
    p.add_argument("--clients", type=int, default=3, help="number of trusted client processes (default 3)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("plist", help="write a launchd plist registering NAME as a MachServices name (macOS)")
    p.add_argument("name", help="service name, e.g. org.example.echo (also the launchd Label)")
    p.add_argument("--program", nargs="+", required=True, metavar="ARG", help="absolute program path and its arguments")
    p.add_argument("--user-agent", action="store_true", help="a per-user LaunchAgent instead of a system LaunchDaemon")
    p.add_argument(
        "-o", "--output",
        help="a file, a directory (DIR/) for NAME.plist, or - for standard output "
        "(default, on macOS only: /Library/LaunchDaemons/NAME.plist or ~/Library/LaunchAgents/NAME.plist)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_plist)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except (IPCError, policies.PolicyFileError) as exc:
        print(f"machipc: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file named on the command line
        where = f": {exc.filename}" if exc.filename else ""
        print(f"machipc: {exc.strerror or _one_line(exc)}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
