"""Run a dispatch Server from a JSON config and print what it bound.

Usage: python tests/serve_script.py '{"handler": "tests.apps:pid_app", "workers": 2}'
Prints one JSON line {"pid", "addresses", "health"} on stdout once bound. With
``$DISPATCH_TEST_EVENTS`` naming a file, the public hooks append one JSON line to it
per call: ``starting`` (on_starting), ``reload`` (on_reload) and ``worker_exit``
(on_worker_exit, with ``worker_id``, the worker's ``pid`` and ``how``), each with
``t``, the primary's ``time.monotonic()``.
"""

import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.getcwd())

import dispatch  # noqa: E402


def emit(event: str, **fields: object) -> None:
    path = os.environ.get("DISPATCH_TEST_EVENTS")
    if not path:
        return
    record = {"event": event, "pid": os.getpid(), "t": time.monotonic(), **fields}
    # Opened per event, so no descriptor of ours is inherited by the workers; no
    # O_CREAT: the test created the file (see tests/helpers.py).
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def main() -> int:
    options = json.loads(sys.argv[1])
    handler = options.pop("handler")
    if "policy" in options:  # an import string naming a policy class: balance=Class()
        module, _, name = options.pop("policy").partition(":")
        options["balance"] = getattr(importlib.import_module(module), name)()
    server = dispatch.Server(
        handler,
        on_starting=lambda s: emit("starting", addresses=s.addresses),
        on_reload=lambda s: emit("reload"),
        on_worker_exit=lambda worker_id, pid, how: emit("worker_exit", worker_id=worker_id,
                                                        pid=pid, how=how),
        **options,
    )
    dispatch.configure_logging(server.config.log_level)
    server.start(install_signal_handlers=True)
    health = server.health.address if server.health is not None else None
    print(json.dumps({"pid": os.getpid(), "addresses": server.addresses, "health": health}), flush=True)
    return server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
