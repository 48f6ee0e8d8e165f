"""The option declarations: Config, the CLI, the README table and ``Options`` all follow them."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import pytest

from dispatch.__main__ import build_parser, main
from dispatch.config import Config
from dispatch.options import OPTIONS, Options, format_value, markdown_table

ROOT = Path(__file__).resolve().parent.parent
NAMES = [option.name for option in OPTIONS]
#: Options whose values are Python objects: no CLI flag (--certfile/--keyfile build ssl).
PYTHON_ONLY = {"ssl", "on_starting", "on_worker_start", "on_worker_exit", "on_reload"}


def handler(*args: Any) -> None:
    pass


def _config_fields() -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(Config) if f.init and f.name != "handler"]


def test_names_are_unique_identifiers() -> None:
    assert len(set(NAMES)) == len(NAMES)
    assert all(name.isidentifier() and name.islower() for name in NAMES)


def test_config_has_one_field_per_option_in_order_with_its_default() -> None:
    fields = _config_fields()
    assert [f.name for f in fields] == NAMES
    config = Config(handler)
    for option in OPTIONS:
        assert getattr(config, option.name) == option.default, option.name


def test_options_typeddict_matches_the_declarations_and_config_types() -> None:
    assert list(Options.__annotations__) == NAMES
    assert Options.__optional_keys__ == frozenset(NAMES)  # total=False: every option may be left out
    options_types = typing.get_type_hints(Options)
    config_types = typing.get_type_hints(Config)
    for name in NAMES:
        assert options_types[name] == config_types[name], name


def test_every_default_passes_its_own_check() -> None:
    for option in OPTIONS:
        option.check(option.name, option.default)


def test_every_option_has_a_flag_or_is_python_only() -> None:
    assert {option.name for option in OPTIONS if not option.flags} == PYTHON_ONLY
    helptext = build_parser().format_help()
    for option in OPTIONS:
        for flag in option.flags:
            assert re.search(rf"{re.escape(flag)}\b(?!-)", helptext), flag
        if option.flags:
            assert option.flags[-1] == "--" + option.name.replace("_", "-")
    assert "-w" in OPTIONS[NAMES.index("workers")].flags
    assert "-b" in OPTIONS[NAMES.index("bind")].flags


def _help_of(helptext: str, flag: str) -> str:
    """The help paragraph of one flag in ``--help``, on one line."""
    found = re.search(rf"^  (?:-\w \S+, )?{re.escape(flag)}\b(?!-).*?(?=^  -|^\n|\Z)",
                      helptext, re.M | re.S)
    assert found, flag
    return " ".join(found.group(0).split())


def test_help_shows_the_config_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside "round-robin"
    helptext = build_parser().format_help()
    config = Config(handler)
    for option in OPTIONS:
        if not option.flags:
            continue
        text = _help_of(helptext, option.flags[-1])
        value = getattr(config, option.name)
        if option.shown_default is not None:
            shown = option.shown_default.replace("`", "").replace('"', "")
            assert f"(default: {shown})" in text, text
            if value is not None and option.name != "workers":  # "0 (off)" says 0
                assert shown.startswith(format_value(value)), option.name
        elif value is None or isinstance(value, bool):
            assert "(default:" not in text, text
        else:
            assert f"(default: {format_value(value)})" in text, text
    assert "(default: os.cpu_count())" in _help_of(helptext, "--workers")
    assert "(default: 127.0.0.1:8000)" in _help_of(helptext, "--bind")
    assert "(default: 5)" in _help_of(helptext, "--client-timeout")


def test_readme_table_is_the_generated_one() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("| option | default | meaning |")
    end = readme.index("\n\n", start) + 1
    assert readme[start:end] == markdown_table(), (
        "README.md's options table is stale; regenerate it with\n"
        "  python -c 'from dispatch.options import markdown_table; print(markdown_table(), end=\"\")'"
    )


def test_table_has_a_row_per_option() -> None:
    rows = markdown_table().splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == [f"| `{name}`" for name in NAMES]
    assert "| `workers` | `os.cpu_count()` |" in rows[0]  # not this machine's count


# ---------------------------------------------------------------- the parser
def test_parser_passes_only_the_options_given() -> None:
    args = vars(build_parser().parse_args(["app:handler"]))
    assert args == {"handler": "app:handler", "certfile": None, "keyfile": None}


def test_parser_types_repeats_and_switches() -> None:
    args = vars(build_parser().parse_args([
        "app:handler", "-w", "3", "-b", "127.0.0.1:0", "--bind", "unix:/tmp/x.sock",
        "--timeout", "1.5", "--preload", "--balance", "least-connections", "--user", "1000",
    ]))
    assert args == {
        "handler": "app:handler", "certfile": None, "keyfile": None, "workers": 3,
        "bind": ["127.0.0.1:0", "unix:/tmp/x.sock"], "timeout": 1.5, "preload": True,
        "balance": "least-connections", "user": "1000",
    }
    del args["handler"], args["certfile"], args["keyfile"], args["user"]
    config = Config("app:handler", **args)
    assert len(config.addresses) == 2 and config.needs_loads


@pytest.mark.parametrize("argv", [
    ["app:handler", "--workers", "many"],
    ["app:handler", "--balance", "fastest"],
    ["app:handler", "--log-level", "loud"],
    ["app:handler", "--no-such-option"],
])
def test_parser_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "workers must be at least 1, got 0"),
    (["--timeout", "-1"], "timeout must be positive, got -1.0"),
    (["--bind", "nowhere"], "bind address 'nowhere' is not HOST:PORT"),
    (["--health", "unix:/tmp/h.sock"], "health must be HOST:PORT"),
    (["--balance", "reuseport", "--bind", "unix:/tmp/x.sock"], "reuseport' needs TCP addresses"),
    (["--keyfile", "key.pem"], "--keyfile needs --certfile"),
])
def test_bad_values_exit_2_with_one_line(argv: list[str], message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tests.apps:pid_app", *argv]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dispatch: error: "), lines
    assert message in lines[0]
