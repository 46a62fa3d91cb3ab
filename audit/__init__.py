"""Audit data at rest: the Kafka -> store sink, the store (chdb or a ClickHouse server),
its migrations and roll-ups; the tamper-evident trail and compliance exports will live here.

Stage in the data flow: sidecar -> tapstream -> Kafka -> **audit** -> ml -> actions/console.
"""
