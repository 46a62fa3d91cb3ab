"""Audit store stage: Kafka -> ClickHouse sink, schema migrations, roll-ups and compliance queries.

Owned stage in the data flow: sidecar -> tapstream -> Kafka -> **store** -> ml -> actions/console.
Built by the audit-taps issue; nothing lives here yet.
"""
