"""``python -m machipc`` / ``machipc``: serve, send, request, demo."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from . import policies
from ._printable import printable
from .client import Client
from .errors import IPCError
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


def cmd_serve(args: argparse.Namespace) -> int:
    policy = policies.load(args.policy_file) if args.policy_file else POLICIES[args.policy]()
    with Server(args.name, policy, enforce=not args.report_only, directory=args.directory) as srv:
        print(f"serving {args.name!r} at {srv.path} with {policy!r}; Ctrl-C to stop", flush=True)

        def handle(msg: Message) -> Optional[bytes]:
            print(_describe(msg), flush=True)
            return bytes(msg.data) if args.echo else b"ok"

        srv.serve(handle)
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    with Client(args.name, timeout=args.timeout, directory=args.directory) as cli:
        cli.send(args.data.encode())
    return 0


def cmd_request(args: argparse.Namespace) -> int:
    with Client(args.name, timeout=args.timeout, directory=args.directory) as cli:
        reply = cli.request(args.data.encode())
    sys.stdout.write(reply.decode("utf-8", "backslashreplace") + "\n")
    return 0


def cmd_unit(args: argparse.Namespace) -> int:
    from .activation import client_unit_file, unit_files, write_units

    if args.client:
        files = client_unit_file(args.name, args.client, args.exec, user=args.user, unit=args.unit)
        then = f"systemctl daemon-reload && systemctl start {next(iter(files))}"
    else:
        files = unit_files(args.name, args.exec, path=args.path, mode=int(args.mode, 8), user=args.user, unit=args.unit)
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
    from .launchd import write_plist

    print(write_plist(args.name, args.program, args.user_agent, args.output))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="machipc",
        description="Kernel-authenticated local IPC: the kernel tells the server who sent each message.",
        epilog="Service names map to sockets: servers bind in $MACHIPC_RUNTIME_DIR, else /run/machipc "
        "(root), else $XDG_RUNTIME_DIR/machipc or /tmp/machipc-UID; clients look in $MACHIPC_RUNTIME_DIR "
        "alone, else in their own per-user directory, then in /run/machipc.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("name", help="service name, e.g. org.example.echo")
        p.add_argument("--directory", help="socket directory (overrides the runtime-dir lookup)")

    p = sub.add_parser("serve", help="serve NAME, printing each message with its sender")
    common(p)
    p.add_argument("--policy", choices=sorted(POLICIES), default="same-user", help="who may talk (default: same-user)")
    p.add_argument("--policy-file", metavar="TOML", help="load the policy from a TOML file (see docs/policies.md)")
    p.add_argument("--report-only", action="store_true", help="log what the policy would reject, but let it through")
    p.add_argument("--echo", action="store_true", help="answer requests with their own payload (default: b'ok')")
    p.set_defaults(func=cmd_serve)

    for name, func, what in (("send", cmd_send, "send a one-way message"), ("request", cmd_request, "send a request and print the reply")):
        p = sub.add_parser(name, help=f"{what} to NAME")
        common(p)
        p.add_argument("data", help="payload (UTF-8 text)")
        p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
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
    p.add_argument("--mode", default="0666", help="SocketMode= in octal (default 0666: the policy is the gate)")
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
    p.add_argument("-o", "--output", help="where to write (default: /Library/LaunchDaemons/NAME.plist or ~/Library/LaunchAgents/NAME.plist)")
    p.set_defaults(func=cmd_plist)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except (IPCError, policies.PolicyFileError) as exc:
        print(f"machipc: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
