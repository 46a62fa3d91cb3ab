"""Audit-tap stage: receives Envoy access-log streams from sidecars and produces them to Kafka.

Owned stage in the data flow: sidecar -> **tapstream** -> Kafka -> store -> ml -> actions/console.
Built by the audit-taps issue; nothing lives here yet.
"""
