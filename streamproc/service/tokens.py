"""The service's token: a random password in a 0600 file, and addresses (main process, client or server).

A client authenticates with the token of the server it connects to (see :mod:`.protocol`).
The default file is ``$XDG_RUNTIME_DIR/streamproc/<port>.token``, else
``~/.cache/streamproc/<port>.token`` (design.md section 5); ``streamproc serve --token-file``
picks another one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Optional

#: Hosts that are this machine only: ``serve --host`` anything else warns.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
#: Bytes of randomness in a token (written as hex: twice as many characters).
TOKEN_BYTES = 32


def default_token_path(port: int) -> Path:
    """Where ``streamproc serve --port port`` writes its token unless told otherwise."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "streamproc" if runtime else Path.home() / ".cache" / "streamproc"
    return base / f"{port}.token"


def new_token() -> str:
    """A fresh random token (``secrets.token_hex``)."""
    return secrets.token_hex(TOKEN_BYTES)


def write_token(path: Path, token: str) -> None:
    """Writes ``token`` to ``path`` (mode 0600, its directory 0700).

    The file is created with its mode (never readable by others, not even for an instant) and
    replaces an older token of the same path.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, token.encode("ascii"))
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_token(path: Path) -> str:
    """The token in ``path``.

    Raises:
        ServiceUnavailableError: no such file (no server started with this port or file).
    """
    from ..errors import ServiceUnavailableError

    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise ServiceUnavailableError(
            f"no token file {path}: is a service running (streamproc serve --port ...)? "
            f"Pass token= or the --token-file the server was started with"
        ) from None


def remove_token(path: Path, token: str) -> None:
    """Removes ``path`` if it still holds ``token`` (a newer server on the port keeps its own)."""
    try:
        if path.read_text(encoding="ascii").strip() == token:
            path.unlink()
    except OSError:
        pass


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"port"``: on 127.0.0.1) as ``(host, port)``.

    >>> parse_address("127.0.0.1:8765")
    ('127.0.0.1', 8765)

    Raises:
        ValueError: not ``host:port`` with a port in 1..65535.
    """
    if not isinstance(address, str):
        raise ValueError(f"connect(address): expected 'host:port', got {type(address).__name__}: {address!r:.80}")
    host, sep, port_text = address.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", address
    port: Optional[int] = int(port_text) if port_text.isdigit() else None
    if port is None or not 0 < port < 65536 or not host.strip("[]"):
        raise ValueError(f"connect(address): expected 'host:port' with a port in 1..65535, got {address!r}")
    return host.strip("[]"), port
