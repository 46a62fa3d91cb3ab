"""The demo workloads `greymesh up` runs: small HTTP services and a steady load generator.

They reach each other only through their sidecars (each service is told its sidecar's
outbound address), which is what makes them a mesh and not a set of direct calls.
"""
