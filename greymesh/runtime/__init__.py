"""The local runtime: a table of workloads, a supervisor that runs it, and the launchers of
the infrastructure (Kafka, ClickHouse server, OPA)."""
