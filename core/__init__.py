"""The ground floor: what every stage shares, and nothing that belongs to one stage.

    datadir.py    the layout of a mesh's data dir; atomic writes
    installs.py   where heavy installs live ($GREYMESH_HOME) and their pinned versions
    endpoints.py  how a component finds another: the mesh's ports and addresses
    contracts.py  topics, event schemas, roll-up columns and OPA paths, defined once
    jsonhttp.py   the one JSON-over-HTTP server base and client
    kafka.py      the one Kafka helper: client credentials (KafkaAuth), readiness and topics
    storeclient.py  the one client of the tap store (the sink's read-only /query API)
    specread.py   reading a YAML spec into typed values, every problem as file:line: key: reason
    errors.py     errors every command maps to an exit code

It imports no stage (controlplane, tapstream, audit, ml, actions, dashboard) and no top
floor (greymesh); tests/test_layers.py holds that.
"""
