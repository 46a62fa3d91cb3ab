"""Anomaly-detection stage: detectors over the per-service roll-ups in the store.

Owned stage in the data flow: sidecar -> tapstream -> Kafka -> store -> **ml** -> actions/console.
It reads ``service_windows`` through the sink's ``/query`` API and writes anomaly events
to Kafka ``greymesh.anomalies`` (docs/ARCHITECTURE.md, "Anomaly detection").
"""
