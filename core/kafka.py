"""The one Kafka helper: is a broker ready, and the topics greymesh needs.

kafka-python is imported inside the functions so that modules importing this one load
without it (the CLI's start-up stays fast).
"""

from __future__ import annotations

from core.wait import wait_until


def broker_ready(bootstrap: str, timeout_s: float = 5.0) -> str | None:
    """None when a broker at ``bootstrap`` answers as an unfenced member of its cluster, else why not."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaConfigurationError

    admin = None
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="greymesh-ready",
                                 request_timeout_ms=int(timeout_s * 1000), bootstrap_timeout_ms=2000)
        brokers = admin.describe_cluster()["brokers"]
        return None if any(not b.get("is_fenced") for b in brokers) else f"no unfenced broker yet: {brokers}"
    except KafkaConfigurationError:  # our mistake, not the broker's: waiting will not help
        raise
    except Exception as exc:  # noqa: BLE001 (connection refused, not yet a leader, ...)
        return repr(exc)
    finally:
        if admin is not None:
            admin.close()


def wait_ready(bootstrap: str, timeout: float) -> float:
    """Wait until the broker at ``bootstrap`` is ready (:func:`broker_ready`); returns the
    seconds waited, raises TimeoutError after ``timeout``."""
    return wait_until(lambda: broker_ready(bootstrap), timeout, f"Kafka at {bootstrap}")


def ensure_topics(bootstrap: str, names: list[str], *, partitions: int = 3, replication: int = 1) -> list[str]:
    """Create the topics of ``names`` that do not exist yet; returns those created.
    Existing topics are left as they are (a cluster's operator may have sized them)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="greymesh-topics", request_timeout_ms=10_000)
    try:
        missing = sorted(set(names) - set(admin.list_topics()))
        if missing:
            try:
                admin.create_topics([NewTopic(n, partitions, replication) for n in missing])
            except TopicAlreadyExistsError:  # another `up` got there first
                pass
        return missing
    finally:
        admin.close()
