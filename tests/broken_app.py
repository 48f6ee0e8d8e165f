"""A handler module that cannot be imported: the crash-loop tests use it."""

raise RuntimeError("broken_app refuses to import")
