"""Anomaly-detection stage: detectors over the per-service roll-ups in the store.

Owned stage in the data flow: sidecar -> tapstream -> Kafka -> store -> **ml** -> actions/console.
Built by the anomaly-detection issue; nothing lives here yet.
"""
