"""``python -m dispatch MODULE:ATTR [options]``: the CLI, one flag per ``serve()`` option."""

from __future__ import annotations

import argparse
import os
import ssl
import sys

from dispatch import __version__
from dispatch.options import OPTIONS, Option, format_value


def build_parser() -> argparse.ArgumentParser:
    """One flag per option of ``dispatch.options`` that is not a Python object."""
    parser = argparse.ArgumentParser(
        prog="python -m dispatch",
        description="Serve MODULE:ATTR on every core: one primary accepts, workers handle.",
        epilog="Signals: TERM/INT graceful stop, QUIT fast stop, HUP/USR2 rolling restart, "
        "TTIN/TTOU one worker more/less, USR1 upgrade the primary, WINCH maintenance on/off. "
        "Running servers: python -m dispatch ctl --help, python -m dispatch top --help.",
    )
    parser.add_argument("handler", metavar="MODULE:ATTR", help="the handler, imported by each worker")
    parser.add_argument("--version", action="version", version=f"dispatch {__version__}")
    for option in OPTIONS:
        if option.cli is not None:
            # An option left out stays out of the namespace, so Config's default applies:
            # the declaration is the only place a default lives.
            parser.add_argument(*option.flags, dest=option.name, default=argparse.SUPPRESS,
                                help=_help(option), **option.cli)
    # The ssl option is an object; these two build it.
    parser.add_argument("--certfile", help="TLS certificate chain (PEM); the handshake runs in the worker")
    parser.add_argument("--keyfile", help="TLS private key (PEM), if not in --certfile")
    return parser


def _prog() -> str:
    return "dispatch" if os.path.basename(sys.argv[0]) == "dispatch" else "python -m dispatch"


def _help(option: Option) -> str:
    """The first sentence of the option's help and its default, as plain text."""
    text = option.cli_help or option.help.split(". ", 1)[0]
    if option.shown_default is not None:
        text += f" (default: {option.shown_default})"
    elif option.default is not None and not isinstance(option.default, bool):
        text += f" (default: {format_value(option.default)})"
    return text.replace("`", "").replace('"', "").replace("%", "%%")  # argparse formats with %


def _tls_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    if certfile is None:
        if keyfile is not None:
            raise ValueError("--keyfile needs --certfile")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load TLS certificate {certfile}: {exc}") from None
    return context


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # A handler is MODULE:ATTR, so these words cannot be one.
    if argv[:1] == ["ctl"]:
        from dispatch import ctl

        return ctl.main(argv[1:], prog=f"{_prog()} ctl")
    if argv[:1] == ["top"]:
        from dispatch import top

        return top.main(argv[1:], prog=f"{_prog()} top")
    args = build_parser().parse_args(argv)
    # As with `python -m`, the current directory is importable (workers inherit sys.path).
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    from dispatch import BindError, BootError, PidfileError, Server, configure_logging

    options = vars(args).copy()  # only the options given: Config supplies the rest
    handler = options.pop("handler")
    try:
        tls = _tls_context(options.pop("certfile"), options.pop("keyfile"))
        if tls is not None:
            options["ssl"] = tls
        server = Server(handler, **options)
    except (TypeError, ValueError) as exc:
        print(f"dispatch: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(server.config.log_level)
    try:
        server.start(install_signal_handlers=True)
    except (BindError, PidfileError) as exc:
        print(f"dispatch: error: {exc}", file=sys.stderr)
        return 1
    code = server.serve_forever()
    if code:
        print(f"dispatch: error: {BootError.__doc__}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
