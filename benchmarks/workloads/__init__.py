"""What is done to a server under test: the comparison's workloads (compare.py: tiny,
keepalive, mixed, slowio), the failure and restart scenarios (failures.py), the abuse
attacks (abuse/) and the restart soak (soak.py)."""
