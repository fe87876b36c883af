"""The service's pure parts, without a server: addresses, tokens, versions, hellos (issue 11 item 3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from streamproc.errors import ServiceUnavailableError
from streamproc.service import protocol
from streamproc.service.tokens import default_token_path, new_token, parse_address, read_token, remove_token, write_token


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1:8765", ("127.0.0.1", 8765)), ("8765", ("127.0.0.1", 8765)), ("[::1]:80", ("::1", 80))],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["127.0.0.1:", "host:0", "host:70000", "host:port", ":80", 8765])
def test_parse_address_refuses_bad_ones_naming_them(address: object) -> None:
    with pytest.raises(ValueError, match=r"connect\(address\)"):
        parse_address(address)  # type: ignore[arg-type]


def test_default_token_path_prefers_xdg_runtime_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_token_path(8765) == tmp_path / "streamproc" / "8765.token"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_token_path(8765) == tmp_path / "home" / ".cache" / "streamproc" / "8765.token"


def test_token_file_is_0600_in_a_0700_directory_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "run" / "streamproc" / "1.token"
    first, second = new_token(), new_token()
    assert first != second and len(first) == 64 and int(first, 16) >= 0
    write_token(path, first)
    write_token(path, second)
    assert read_token(path) == second
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert os.listdir(path.parent) == ["1.token"]  # no temporary file left
    remove_token(path, first)  # another server's token: kept
    assert path.exists()
    remove_token(path, second)
    assert not path.exists()


def test_a_missing_token_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ServiceUnavailableError, match=r"no token file .*9\.token"):
        read_token(tmp_path / "9.token")


def test_version_mismatch_names_each_difference() -> None:
    server = {"streamproc": "0.1.0", "dill": "0.3.8", "python": "3.11.7"}
    assert protocol.version_mismatch(server, dict(server)) is None
    client = {**server, "dill": "0.3.9", "python": "3.12.1"}
    assert protocol.version_mismatch(server, client) == (
        "dill 0.3.8 on the server, 0.3.9 in the client; python 3.11.7 on the server, 3.12.1 in the client"
    )


def test_local_versions_are_what_is_compared() -> None:
    import dill

    import streamproc

    versions = protocol.local_versions()
    assert versions["streamproc"] == streamproc.__version__ and versions["dill"] == dill.__version__
    assert versions["python"].count(".") == 2


def test_hello_round_trips_and_refuses_anything_else() -> None:
    hello = protocol.Hello("run", {"dill": "0.3.8"})
    assert protocol.Hello.from_bytes(hello.to_bytes()) == hello
    for bad in (json.dumps({"kind": "exec", "versions": {}}).encode(), b"[1, 2]", json.dumps({"kind": "run"}).encode()):
        with pytest.raises(ValueError, match="not a streamproc hello"):
            protocol.Hello.from_bytes(bad)
