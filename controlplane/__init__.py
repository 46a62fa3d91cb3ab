"""greymesh control plane: mesh spec, xDS server, identities, authorization and policy.

Data flow it drives: mesh.yaml + placement -> Envoy resources -> per-node snapshots
-> ADS streams to every sidecar; OPA's policy and mesh data; the ext_authz bridge.
"""
