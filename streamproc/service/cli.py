"""``streamproc serve | status | stop``: the service's command line (also ``python -m streamproc``).

``serve`` starts the server: without ``--foreground`` it starts itself again detached (a new
session, its output to a log file next to the token) and returns once that server listens,
printing its address, pid and token file; a server that fails to start has its log shown and
``serve`` exits with status 1. ``status`` prints what the server reports; ``stop`` asks it to
stop and waits until its process is gone (runs already started finish first).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from ..options import DeviceSpec

#: How long ``serve`` waits for the detached server to listen (it imports torch, starts workers).
READY_TIMEOUT_S = 120.0
#: How long ``stop`` waits for the server's process to end (its runs finish first: see server.py).
STOP_WAIT_S = 60.0
READY_LINE_PREFIX = "streamproc service ready"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamproc", description="streamproc: a warm worker pool as a local service")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start a service (a warm WorkerPool behind an authenticated listener)")
    serve.add_argument("--cpu-workers", type=int, default=None, help="CPU worker processes (default: one per spare CPU)")
    serve.add_argument("--gpu-workers", type=int, default=None, help="GPU worker processes (default: one per device)")
    serve.add_argument("--gpu-devices", default=None, help="the GPU workers' devices, comma-separated: cuda:0,cuda:1")
    serve.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), default=None)
    serve.add_argument("--foreground", action="store_true", help="stay attached (default: detach once ready)")
    for command in (serve, commands.add_parser("status", help="print a service's workers, models and runs"),
                    commands.add_parser("stop", help="stop a service (its runs finish first)")):
        command.add_argument("--port", type=int, required=True)
        command.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (serve warns on another)")
        command.add_argument("--token-file", default=None, help="default $XDG_RUNTIME_DIR/streamproc/<port>.token")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """The command line (main process); returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve_foreground(args) if args.foreground else _serve_detached(args, argv)
    from ..errors import StreamprocError
    from .client import ServicePool, token_file_of
    from .tokens import read_token

    try:
        pool = ServicePool(f"{args.host}:{args.port}", read_token(token_file_of(args.port, args.token_file)))
        if args.command == "status":
            print(json.dumps(pool.status(), indent=2))
            return 0
        pid = pool.stop()
    except StreamprocError as exc:
        print(f"streamproc {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0 if _wait_gone(pid, STOP_WAIT_S) else _report_still_running(pid)


def _devices(text: Optional[str]) -> Optional[list[DeviceSpec]]:
    return [d.strip() for d in text.split(",") if d.strip()] if text else None


def _serve_foreground(args: argparse.Namespace) -> int:
    """Runs the server in this process until stopped (main process of the server)."""
    from .client import token_file_of
    from .pool import WorkerPool
    from .server import ServiceServer
    from .tokens import new_token, write_token

    for name in ("cpu_workers", "gpu_workers"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "cpu_workers" else 0):
            print(f"streamproc serve: --{name.replace('_', '-')} must be >= {1 if name == 'cpu_workers' else 0}", file=sys.stderr)
            return 2
    token_path = token_file_of(args.port, args.token_file)
    token = new_token()
    try:
        server = ServiceServer(args.host, args.port, token, token_path)
    except OSError as exc:
        print(f"streamproc serve: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    try:
        pool = WorkerPool(
            num_cpu_workers=args.cpu_workers, num_gpu_workers=args.gpu_workers,
            gpu_worker_devices=_devices(args.gpu_devices), process_start_method=args.start_method,
        )
    except ValueError as exc:
        server.close()
        print(f"streamproc serve: {exc}", file=sys.stderr)
        return 2
    # Written once the port is ours: a second `serve` on a busy port leaves the first one's token be.
    write_token(token_path, token)
    server.install_signal_handlers()
    print(f"{READY_LINE_PREFIX} at {server.address}, pid {os.getpid()}, token file {token_path}", flush=True)
    ready_fd = os.environ.pop("STREAMPROC_READY_FD", None)
    if ready_fd is not None:  # the detaching parent waits for this line
        with os.fdopen(int(ready_fd), "w") as ready:
            ready.write(f"{os.getpid()}\n")
    server.serve_until_stopped(pool)
    return 0


def _serve_detached(args: argparse.Namespace, argv: Optional[list[str]]) -> int:
    """Starts ``serve --foreground`` detached and returns once it listens (the command's process)."""
    from .client import token_file_of
    from .tokens import LOOPBACK_HOSTS

    if args.host not in LOOPBACK_HOSTS:
        print(f"streamproc serve: warning: listening on {args.host}, not only on this machine: anyone who can "
              f"reach it and has the token can run code here", file=sys.stderr)
    log_path = token_file_of(args.port, args.token_file).with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    read_fd, write_fd = os.pipe()
    command = [sys.executable, "-m", "streamproc", *(argv if argv is not None else sys.argv[1:]), "--foreground"]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            pass_fds=(write_fd,), env={**os.environ, "STREAMPROC_READY_FD": str(write_fd)},
        )
    os.close(write_fd)
    with os.fdopen(read_fd) as ready:
        import select

        readable, _, _ = select.select([ready], [], [], READY_TIMEOUT_S)
        line = ready.readline() if readable else ""
    if not line.strip():  # it exited (or hung) before listening
        if process.poll() is None:
            process.kill()
        process.wait()
        tail = Path(log_path).read_text(errors="replace")[-4000:]
        print(f"streamproc serve: the server did not start (log {log_path}):\n{tail}", file=sys.stderr)
        return 1
    print(f"{READY_LINE_PREFIX} at {args.host}:{args.port}, pid {line.strip()}, log {log_path}", flush=True)
    return 0


def _wait_gone(pid: int, timeout_s: float) -> bool:
    import psutil

    try:
        psutil.Process(pid).wait(timeout_s)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False
    return True


def _report_still_running(pid: int) -> int:
    print(f"streamproc stop: the server (pid {pid}) is still running after {STOP_WAIT_S:.0f} s", file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover - python -m streamproc.service.cli
    sys.exit(main())
