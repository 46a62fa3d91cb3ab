"""Operator console (Dash): service graph, traffic, anomalies, audit trail, Rego authoring.

Last stage in the data flow: sidecar -> tapstream -> Kafka -> store -> ml -> **actions/console**.
Nothing lives here yet.
"""
