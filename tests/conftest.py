"""Fixtures every test module can use: a ClickHouse server and fresh stores of both
backends (tests/support/clickhouse.py).  Also each test's tier, and the time bound of
every async test.

Tiers (markers registered in pyproject.toml, selected with ``-m``):

    unit         no real component: pure Python (ours and its libraries), tmp files,
                 in-process servers on loopback, at most a short run of our own CLI
    integration  one real component: Kafka, OPA, Envoy, a ClickHouse server, chdb, or
                 our supervisor over real processes
    e2e          a whole mesh (`greymesh up`), or several real components together

Each test module gets its tier from TIERS below, so the test files need no marks.  A
module holding tests of several tiers is listed under the heaviest; a tier mark of its
own (a module-level ``pytestmark``, or a mark on a class or test) wins over the table.
A test module missing from TIERS fails the collection, naming the module.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ("tests.support.clickhouse",)

TESTS = Path(__file__).resolve().parent

UNIT, INTEGRATION, E2E = "unit", "integration", "e2e"

# Test module (its path under tests/) -> tier.  A new test module joins here.
TIERS: dict[str, str] = {
    "test_credentials.py": UNIT,        # secrets: 0600 files, created once, refused when open to others
    "test_alerts.py": UNIT,             # alert grouping, silences, outbox, delivery to loopback Slack/PagerDuty contracts
    "test_security_api.py": E2E,        # attacks on every HTTP API: the guard in process (unit cases), the
                                        # real daemons of one mesh
    "test_identity.py": UNIT,           # the CA; TLS handshakes in memory with OpenSSL
    "test_security_files.py": UNIT,     # the data dir and state files are private
    "test_layers.py": UNIT,             # the import layers, read from the source (AST)
    "test_loop.py": UNIT,               # the actions loop's judge, guardrails and decisions, with fakes
    "test_loop_samples.py": INTEGRATION,  # the loop's sample query on chdb and a real ClickHouse server
    "test_meshspec.py": UNIT,           # mesh.yaml parsing and its error messages
    "test_loopspec.py": UNIT,           # mesh.yaml's alerts: and actions: sections, and their errors
    "test_ml.py": UNIT,                 # detectors, registry, scorer, eval on generated windows (GRU cases:
                                        # integration, they train a network)
    "test_ml_scenarios.py": INTEGRATION,  # trains the autoencoder on tests/data/scenarios (seconds of CPU)
    "test_spool.py": UNIT,              # the on-disk spool (and a SIGKILLed Python appender)
    "test_xds_ads.py": UNIT,            # our ADS server in process, against simulated Envoys
    "test_overrides.py": UNIT,          # overrides merged over the spec; the control plane's /overrides in process
    "test_cli.py": INTEGRATION,         # `greymesh` answers; doctor runs envoy, opa, kafka, clickhouse
    "test_kafka_broker.py": INTEGRATION,  # a real Kafka (KRaft)
    "test_security_kafka.py": INTEGRATION,  # forged produce/consume on a real, secured Kafka: refused
    "test_mtls_envoy.py": INTEGRATION,  # two real Envoys on our in-process ADS (one unit test too)
    "test_policies.py": INTEGRATION,    # a real OPA
    "test_security_opa.py": INTEGRATION,  # attacks on a real OPA: its API obeys the control plane only; the hash is OPA's
    "test_store.py": INTEGRATION,       # chdb, and a real ClickHouse server
    "test_security_query.py": INTEGRATION,  # the query sandbox's attacks on chdb and a real ClickHouse server
    "test_supervisor.py": INTEGRATION,  # our supervisor daemon over real child processes, killed and restarted
    "test_actions_replay.py": UNIT,     # an hour of recorded normal windows through scorer, loop and notifier: silence
    "test_actions_service.py": INTEGRATION,  # the actions process and its Kafka edges, killed -9 mid-episode
    "test_tap_producer.py": INTEGRATION,  # a real Kafka
    "test_sink.py": E2E,                # a real Kafka into chdb or a ClickHouse server
    "test_runtime.py": E2E,             # two meshes side by side (and two unit tests)
    "test_mesh_e2e.py": E2E,            # the demo mesh
    "test_taps_e2e.py": E2E,            # the demo mesh with its taps, Kafka and ClickHouse
    "test_zero_trust_e2e.py": E2E,      # the demo mesh with OPA and mTLS
    "test_security_ingress.py": E2E,    # the ingress (TLS, JWT, authz) and path tricks on the demo mesh
    "test_security_sidecar.py": E2E,    # impostor sidecars on ADS, ALS and ext_authz: in process (unit cases) and on the demo mesh
    "test_ml_e2e.py": E2E,
    "test_actions_e2e.py": E2E,         # the demo mesh: the loop blind with the scorer stopped; the CLI and a receiver test
    "scenarios_actions.py": E2E,        # by hand only (not test_*): the scenarios on a trained model (see its doc)              # the demo mesh with its scorer
    "test_faults.py": E2E,              # kill -9 of each component of the demo mesh
    "test_benchmarks.py": E2E,          # the benchmarks, on real meshes
}
TIER_NAMES = frozenset((UNIT, INTEGRATION, E2E))
assert set(TIERS.values()) <= TIER_NAMES, "TIERS names a tier that is not unit, integration or e2e"

# Each async test fails once it has run this long (a stuck stream must not hang the run).
ASYNC_TEST_TIMEOUT_S = 30.0


def _module(item: pytest.Item) -> str:
    """The key of ``item``'s test module in TIERS: its path under tests/."""
    try:
        return item.path.resolve().relative_to(TESTS).as_posix()
    except ValueError:
        return item.path.name


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing: set[str] = set()
    doubled: list[str] = []
    for item in items:
        own = {m.name for m in item.iter_markers() if m.name in TIER_NAMES}
        if len(own) > 1:
            doubled.append(f"{item.nodeid} ({', '.join(sorted(own))})")
        elif own:
            continue
        elif (tier := TIERS.get(_module(item))) is None:
            missing.add(_module(item))
        else:
            item.add_marker(tier)
    problems = [f"tests/{m} has no test tier: add it to TIERS in tests/conftest.py as unit, integration or e2e"
                for m in sorted(missing)]
    problems += [f"{d} is marked with more than one test tier: keep one" for d in doubled]
    if problems:
        raise pytest.UsageError(*problems)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Run each async test (pytest-asyncio's ``@pytest.mark.asyncio``) under a time bound."""
    test = getattr(item, "obj", None)
    if item.get_closest_marker("asyncio") is None or not inspect.iscoroutinefunction(test):
        return (yield)

    @functools.wraps(test)
    async def bounded(*args: object, **kwargs: object) -> None:
        try:
            async with asyncio.timeout(ASYNC_TEST_TIMEOUT_S) as bound:
                await test(*args, **kwargs)
        except TimeoutError:
            if bound.expired():
                pytest.fail(f"{item.name} still ran after {ASYNC_TEST_TIMEOUT_S:g} s, the bound of every "
                            "async test (ASYNC_TEST_TIMEOUT_S in tests/conftest.py)")
            raise

    item.obj = bounded  # type: ignore[attr-defined]  # pytest-asyncio runs item.obj on its loop
    try:
        return (yield)
    finally:
        item.obj = test  # type: ignore[attr-defined]
