"""Attacks on a live dispatch server: does the primary stay up, keep serving, keep its
descriptors? base.py (what every attack shares), clients.py (the attackers' side),
connections.py and misuse.py (the attacks), suite.py (the list, with what a sound server
does)."""
