"""Web applications (ASGI, WSGI) on dispatch's workers: ``pip install 'dispatch[web]'``.

``uvicorn_bridge`` holds every use of uvicorn's internals (its per-connection HTTP and
WebSocket protocols, its lifespan); ``dispatch.runners.web`` serves connections with it;
``dispatch.interfaces`` tells an ASGI app from a WSGI app from a plain handler. Nothing here
is imported unless a worker serves a web app.
"""
