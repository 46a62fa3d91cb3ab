"""The one Kafka helper: who a client is (:class:`KafkaAuth`), is a broker ready, and the
topics greymesh needs.

A local mesh's broker admits only authenticated clients (docs/security.md, "Kafka"):

- the broker itself (:data:`BROKER`) and the runtime's admin (:data:`ADMIN`) authenticate
  with SASL/PLAIN against passwords in the broker's own 0600 config; they are Kafka's
  super users and must work before the cluster's metadata exists;
- every component has a principal of its own (:data:`TAPS`, :data:`SINK`, :data:`SCORER`,
  :data:`READER`) that authenticates with SCRAM-SHA-512; its credential lives in the
  cluster's metadata, put there by the admin, and its ACLs allow only what it does.

Each principal's password is a 0600 secret named after it (:func:`secret_path`); a
component is given that file's path and builds its kafka-python settings with
:meth:`KafkaAuth.client_config`, the one place client security is set.

kafka-python is imported inside the functions so that modules importing this one load
without it (the CLI's start-up stays fast).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core import credentials
from core.datadir import DataDir
from core.endpoints import Endpoints
from core.wait import wait_until

BROKER, ADMIN = "broker", "admin"  # SASL/PLAIN; super users (the broker's own config lists them)
TAPS, SINK, SCORER, READER = "taps", "sink", "scorer", "reader"  # SCRAM-SHA-512, limited by ACLs
ACTIONS = "actions"  # the actions stage: reads anomalies (no group: it keeps its offsets itself), writes decisions
PLAIN_PRINCIPALS = (BROKER, ADMIN)
SCRAM_PRINCIPALS = (TAPS, SINK, SCORER, READER, ACTIONS)
SCRAM_MECHANISM = "SCRAM-SHA-512"
SINK_GROUP = "greymesh-sink"  # the sink's consumer group, the only group any ACL grants
SECURITY_PROTOCOL = "SASL_PLAINTEXT"  # loopback only; see docs/security.md for why not TLS

Mechanism = Literal["PLAIN", "SCRAM-SHA-512"]


def secret_path(dd: DataDir, principal: str) -> Path:
    """The 0600 file holding ``principal``'s Kafka password; its name is the principal."""
    return dd.secret(f"kafka/{principal}")


@dataclass(frozen=True)
class KafkaAuth:
    """Who a Kafka client is: a principal and the 0600 file holding its password.

    The password is read when a client is configured (:meth:`client_config`), never kept
    on argv or in this object's repr."""

    principal: str
    secret: Path

    @classmethod
    def from_secret(cls, secret: Path) -> KafkaAuth:
        """The credential in ``secret``, a file named after its principal (:func:`secret_path`)."""
        secret = Path(secret)
        if secret.name not in (*PLAIN_PRINCIPALS, *SCRAM_PRINCIPALS):
            raise credentials.CredentialError(
                f"{secret}: not a Kafka principal's secret (the file name must be one of "
                f"{', '.join((*PLAIN_PRINCIPALS, *SCRAM_PRINCIPALS))}); pass a file from "
                f"<data dir>/secrets/kafka/")
        return cls(secret.name, secret)

    @classmethod
    def of(cls, dd: DataDir, principal: str) -> KafkaAuth:
        """``principal``'s credential in the mesh of ``dd``."""
        return cls(principal, secret_path(dd, principal))

    @property
    def mechanism(self) -> Mechanism:
        return "PLAIN" if self.principal in PLAIN_PRINCIPALS else SCRAM_MECHANISM

    def password(self) -> str:
        """The password (CredentialError when the file is missing or open to others)."""
        return credentials.read(self.secret)

    def client_config(self) -> dict[str, str]:
        """kafka-python's settings (KafkaProducer, KafkaConsumer, KafkaAdminClient) for this principal."""
        return {"security_protocol": SECURITY_PROTOCOL, "sasl_mechanism": self.mechanism,
                "sasl_plain_username": self.principal, "sasl_plain_password": self.password()}


def mesh_auth(dd: DataDir, endpoints: Endpoints, principal: str) -> KafkaAuth | None:
    """``principal``'s credential for the Kafka of the mesh in ``dd``: None when the mesh
    uses an external cluster (``up --kafka``), whose credentials greymesh does not hold."""
    return KafkaAuth.of(dd, principal) if endpoints.kafka is None else None


def add_secret_argument(parser: argparse.ArgumentParser) -> None:
    """A component's ``--kafka-secret PATH``: the file of its principal's password."""
    parser.add_argument("--kafka-secret", type=Path, metavar="PATH",
                        help="the 0600 file of this component's Kafka password, named after its principal "
                             "(<data dir>/secrets/kafka/<principal>); omit for a broker without authentication")


def auth_from_args(args: argparse.Namespace) -> KafkaAuth | None:
    """The credential :func:`add_secret_argument` was given, checked readable now (a bad
    file is reported at start, not at the first connection)."""
    if args.kafka_secret is None:
        return None
    auth = KafkaAuth.from_secret(args.kafka_secret)
    auth.password()
    return auth


def client_config(auth: KafkaAuth | None) -> dict[str, str]:
    """kafka-python's security settings: ``auth``'s, or none for a broker that asks for no
    credential (an external cluster given with ``--kafka``)."""
    return auth.client_config() if auth is not None else {}


def broker_ready(bootstrap: str, timeout_s: float = 5.0, *, auth: KafkaAuth | None = None) -> str | None:
    """None when a broker at ``bootstrap`` answers ``auth`` as an unfenced member of its
    cluster, else why not (kafka-python reports refused credentials as a failed bootstrap,
    and logs the broker's refusal under ``kafka.net``)."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaConfigurationError

    admin = None
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="greymesh-ready",
                                 request_timeout_ms=int(timeout_s * 1000), bootstrap_timeout_ms=2000,
                                 **client_config(auth))
        brokers = admin.describe_cluster()["brokers"]
        return None if any(not b.get("is_fenced") for b in brokers) else f"no unfenced broker yet: {brokers}"
    except (KafkaConfigurationError, credentials.CredentialError):  # ours to fix: waiting will not help
        raise
    except Exception as exc:  # noqa: BLE001 (connection refused, not yet a leader, ...)
        return repr(exc)
    finally:
        if admin is not None:
            admin.close()


def wait_ready(bootstrap: str, timeout: float, *, auth: KafkaAuth | None = None) -> float:
    """Wait until the broker at ``bootstrap`` is ready (:func:`broker_ready`); returns the
    seconds waited, raises TimeoutError after ``timeout``."""
    return wait_until(lambda: broker_ready(bootstrap, auth=auth), timeout, f"Kafka at {bootstrap}")


def ensure_topics(bootstrap: str, names: list[str], *, partitions: int = 3, replication: int = 1,
                  auth: KafkaAuth | None = None) -> list[str]:
    """Create the topics of ``names`` that do not exist yet; returns those created.
    Existing topics are left as they are (a cluster's operator may have sized them)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="greymesh-topics", request_timeout_ms=10_000,
                             **client_config(auth))
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
