"""greymesh control plane: mesh spec, xDS server, identities and the local runtime.

Data flow it starts: mesh.yaml + placement -> Envoy resources -> per-node snapshots
-> ADS streams to every sidecar.
"""
