"""The demo workloads: services that call each other through their sidecars, and steady load."""
