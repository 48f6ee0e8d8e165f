"""Config validation and bind-address parsing: errors before anything forks."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import socket
import ssl
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatch.balance import LeastConnections, RoundRobin, Sticky
from dispatch.config import Address, Config


def handler(*args: Any) -> None:
    pass


# ------------------------------------------------------------------- Address
@pytest.mark.parametrize(
    "text, family, host, port",
    [
        ("127.0.0.1:8000", socket.AF_INET, "127.0.0.1", 8000),
        ("localhost:0", socket.AF_INET, "localhost", 0),
        (":80", socket.AF_INET, "0.0.0.0", 80),
        ("0.0.0.0:65535", socket.AF_INET, "0.0.0.0", 65535),
        ("[::1]:8080", socket.AF_INET6, "::1", 8080),
        ("[::]:443", socket.AF_INET6, "::", 443),
        ("unix:/tmp/app.sock", socket.AF_UNIX, "/tmp/app.sock", 0),
        ("unix:relative.sock", socket.AF_UNIX, "relative.sock", 0),
    ],
)
def test_parse_address(text: str, family: int, host: str, port: int) -> None:
    assert Address.parse(text) == Address(family, host, port)


@pytest.mark.parametrize("text", ["127.0.0.1:8000", "[::1]:8080", "unix:/tmp/app.sock"])
def test_address_str_roundtrips(text: str) -> None:
    assert str(Address.parse(text)) == text


@pytest.mark.parametrize(
    "text, message",
    [
        ("localhost", "is not HOST:PORT"),
        ("localhost:", "is not HOST:PORT"),
        ("localhost:http", "is not HOST:PORT"),
        ("localhost:-1", "is not HOST:PORT"),
        ("", "is not HOST:PORT"),
        ("[::1]", "is not HOST:PORT"),
        ("localhost:65536", "port 65536 is out of range"),
        ("::1:80", "write IPv6 hosts in brackets"),
        ("unix:", "has an empty path"),
    ],
)
def test_parse_bad_address(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        Address.parse(text)
    assert repr(text) in str(info.value)  # the message quotes what was given


def test_parse_address_needs_a_string() -> None:
    with pytest.raises(TypeError, match="bind address must be a string, not int"):
        Address.parse(8000)  # type: ignore[arg-type]


@given(st.text(max_size=30))
def test_parse_any_text_gives_an_address_or_value_error(text: str) -> None:
    try:
        address = Address.parse(text)
    except ValueError:
        return
    assert address.family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)
    assert 0 <= address.port <= 65535


@given(st.integers(0, 65535))
def test_parse_any_port(port: int) -> None:
    assert Address.parse(f"10.0.0.1:{port}").port == port
    assert Address.parse(f"[fe80::1]:{port}").port == port


# -------------------------------------------------------------------- Config
def test_defaults_are_valid() -> None:
    config = Config(handler)
    assert config.workers >= 1
    assert config.addresses == (Address(socket.AF_INET, "127.0.0.1", 8000),)
    assert config.health_address is None
    assert config.user_space


def test_several_binds_and_health() -> None:
    config = Config(handler, bind=["127.0.0.1:0", "[::1]:0", "unix:/tmp/x.sock"], health=":9000")
    assert [a.family for a in config.addresses] == [socket.AF_INET, socket.AF_INET6, socket.AF_UNIX]
    assert config.health_address == Address(socket.AF_INET, "127.0.0.1", 9000)


def test_import_string_handler() -> None:
    assert Config("tests.apps:echo", preload=True).handler == "tests.apps:echo"


@pytest.mark.parametrize("text", ["tests.apps", "tests.apps:", ":echo"])
def test_bad_import_string(text: str) -> None:
    with pytest.raises(ValueError, match="must look like 'package.module:attr'"):
        Config(text)


def test_handler_must_be_callable() -> None:
    with pytest.raises(TypeError, match="handler must be callable"):
        Config(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "option, value, error, message",
    [
        ("workers", 0, ValueError, "workers must be at least 1, got 0"),
        ("workers", 1.5, TypeError, "workers must be an int, not float"),
        ("workers", True, TypeError, "workers must be an int, not bool"),
        ("workers", "4", TypeError, "workers must be an int, not str"),
        ("threads", 0, ValueError, "threads must be at least 1"),
        ("backlog", -1, ValueError, "backlog must be at least 1"),
        ("restart_batch", 0, ValueError, "restart_batch must be at least 1"),
        ("accept_batch", 0, ValueError, "accept_batch must be at least 1"),
        ("accept_batch", 4097, ValueError, "accept_batch must be at most 4096"),
        ("max_requests", -1, ValueError, "max_requests must be at least 0"),
        ("max_requests_jitter", -1, ValueError, "max_requests_jitter must be at least 0"),
        ("max_memory", -1, ValueError, "max_memory must be at least 0"),
        ("timeout", 0, ValueError, "timeout must be positive, got 0"),
        ("timeout", float("nan"), ValueError, "timeout must be positive"),
        ("graceful_timeout", -1.0, ValueError, "graceful_timeout must be positive"),
        ("boot_timeout", "30", TypeError, "boot_timeout must be a number, not str"),
        ("boot_timeout", False, TypeError, "boot_timeout must be a number, not bool"),
        ("balance", "fastest", ValueError, "balance must be one of round-robin, "),
        ("balance", object(), TypeError, "balance must be a mode name"),
        ("bind", [], ValueError, "bind needs at least one address"),
        ("bind", "nowhere", ValueError, "bind address 'nowhere'"),
        ("bind", [8000], TypeError, "bind address must be a string"),
        ("health", "unix:/tmp/h.sock", ValueError, "health must be HOST:PORT"),
        ("health", "nonsense", ValueError, "bind address 'nonsense'"),
        ("log_level", "loud", ValueError, "log_level must be one of debug, info"),
        ("log_level", 10, ValueError, "log_level must be one of"),
        ("preload", True, ValueError, "preload applies to an import-string handler"),
        ("preload", 1, TypeError, "preload must be True or False, not int"),
        ("server_speaks_first", "yes", TypeError, "server_speaks_first must be True or False"),
        ("client_timeout", float("inf"), ValueError, "client_timeout must be a finite number"),
        ("pidfile", 3, TypeError, "pidfile must be a path, not int"),
        ("ssl", "cert.pem", TypeError, "ssl must be an ssl.SSLContext, not str"),
        ("on_reload", "reload", TypeError, "on_reload must be callable, not str"),
        ("user", 1.5, TypeError, "user must be a name or uid, not float"),
        ("group", "no-such-group-here", ValueError, "group 'no-such-group-here' does not exist"),
    ],
)
def test_validation_errors_name_the_option(option: str, value: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(")):
        Config(handler, **{option: value})


def test_numbers_that_are_accepted() -> None:
    config = Config(handler, workers=3, timeout=1, graceful_timeout=0.5, max_requests=0,
                    accept_batch=4096, log_level="DEBUG")
    assert config.timeout == 1.0
    assert config.heartbeat_interval == 0.25
    assert Config(handler, timeout=60).heartbeat_interval == 1.0


def test_reuseport_refuses_unix_sockets() -> None:
    with pytest.raises(ValueError, match="reuseport.*unix"):
        Config(handler, balance="reuseport", bind=["127.0.0.1:0", "unix:/tmp/x.sock"])
    # The shared listener works with any family; reuseport with TCP.
    assert not Config(handler, balance="shared", bind="unix:/tmp/x.sock").user_space
    assert not Config(handler, balance="reuseport", bind="[::1]:0").user_space


def test_custom_policy_is_user_space() -> None:
    assert Config(handler, balance=LeastConnections()).user_space


def test_health_port_alone_means_loopback() -> None:
    from dispatch.config import Config

    for text in ("9000", ":9000"):
        address = Config(print, health=text).health_address
        assert (address.host, address.port) == ("127.0.0.1", 9000)


# -------------------------------------------------------- balance, decided once
@pytest.mark.parametrize(
    "balance, policy_type, needs_loads",
    [("round-robin", RoundRobin, False), ("least-connections", LeastConnections, True),
     ("sticky", Sticky, True), ("reuseport", type(None), False), ("shared", type(None), False)],
)
def test_balance_mode_becomes_a_policy(balance: str, policy_type: type, needs_loads: bool) -> None:
    config = Config(handler, balance=balance)
    assert type(config.policy) is policy_type
    assert config.needs_loads is needs_loads
    assert config.user_space is (config.policy is not None)
    assert config.balance == balance  # what was asked for stays readable (logs, /cluster-health)


def test_each_config_gets_its_own_policy_but_keeps_the_users() -> None:
    assert Config(handler).policy is not Config(handler).policy  # policies carry state
    mine = LeastConnections()
    config = Config(handler, balance=mine)
    assert config.policy is mine and config.needs_loads


def test_replace_copy_and_pickle_keep_a_valid_config() -> None:
    config = Config("tests.apps:echo", bind=["127.0.0.1:0", "unix:/tmp/x.sock"], health="9000",
                    balance="least-connections", timeout=8, user=0)
    replaced = dataclasses.replace(config, handler=handler, preload=False)
    assert replaced.addresses == config.addresses and replaced.uid == 0 and replaced.gid == 0
    assert isinstance(replaced.policy, LeastConnections) and replaced.policy is not config.policy
    for twin in (copy.copy(config), copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert twin == config
        assert twin.addresses == config.addresses and twin.health_address == config.health_address
        assert isinstance(twin.policy, LeastConnections) and twin.needs_loads
        assert twin.stall_after == config.stall_after == 2.5


def test_config_is_frozen() -> None:
    config = Config(handler)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.workers = 3  # type: ignore[misc]


def test_ssl_context_is_accepted() -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    assert Config(handler, ssl=context).ssl is context
