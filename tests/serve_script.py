"""Run a dispatch Server from a JSON config and print what it bound.

Usage: python tests/serve_script.py '{"handler": "tests.apps:pid_app", "workers": 2}'
Prints one JSON line {"pid", "addresses", "health"} on stdout once bound.
"""

import importlib
import json
import os
import sys

sys.path.insert(0, os.getcwd())

import dispatch  # noqa: E402


def main() -> int:
    options = json.loads(sys.argv[1])
    handler = options.pop("handler")
    if "policy" in options:  # an import string naming a policy class: balance=Class()
        module, _, name = options.pop("policy").partition(":")
        options["balance"] = getattr(importlib.import_module(module), name)()
    server = dispatch.Server(handler, **options)
    dispatch.configure_logging(server.config.log_level)
    server.start(install_signal_handlers=True)
    health = server.health.address if server.health is not None else None
    print(json.dumps({"pid": os.getpid(), "addresses": server.addresses, "health": health}), flush=True)
    return server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
