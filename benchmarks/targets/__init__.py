"""The servers under test and how each is started and stopped: dispatch in each balance mode,
the peers (Node.js cluster, gunicorn, uvicorn), the floors (servers.py); dispatch under abuse
(abuse.py, abuse_command.py, which runs abuse_apps.py)."""
