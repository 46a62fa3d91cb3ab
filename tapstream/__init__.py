"""Audit-tap stage: Envoy's access-log streams and OPA's decision logs -> tap events -> Kafka.

Stage in the data flow: sidecar -> **tapstream** -> Kafka -> audit (store) -> ml -> actions/console.
"""
