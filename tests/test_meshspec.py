"""The mesh spec: the demo parses into the model, and every mistake is named with its path and line."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import yaml

from controlplane.meshspec import (
    CircuitBreaker,
    Fault,
    FaultAbort,
    FaultDelay,
    Instance,
    MeshSpec,
    OutlierDetection,
    Problem,
    RetryPolicy,
    Route,
    RouteMatch,
    SpecError,
    load_spec,
    parse_spec,
)

DEMO_SPEC = Path(__file__).resolve().parents[1] / "deploy" / "demo" / "mesh.yaml"
DEMO = DEMO_SPEC.read_text(encoding="utf-8")


def edit(old: str, new: str, text: str = DEMO) -> str:
    """`text` with its one occurrence of `old` replaced, so each test changes exactly what it says."""
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)


def line_of(text: str, needle: str) -> int:
    """The 1-based line holding `needle`, found by plain text search (independent of YAML)."""
    lines = [n for n, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(lines) == 1, f"{needle!r} is on lines {lines}"
    return lines[0]


def block(head: str, text: str = DEMO) -> str:
    """The line starting with `head` and the more indented lines under it."""
    lines = text.splitlines(keepends=True)
    start = next(n for n, line in enumerate(lines) if line.startswith(head))
    depth = len(head) - len(head.lstrip())
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > depth):
        end += 1
    return "".join(lines[start:end])


def problems(text: str) -> list[Problem]:
    with pytest.raises(SpecError) as info:
        parse_spec(text, source="mesh.yaml")
    return info.value.problems


def only_problem(text: str) -> Problem:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


# --- the demo ---------------------------------------------------------------------


def test_demo_parses_into_the_expected_model():
    spec = load_spec(DEMO_SPEC)
    assert (spec.name, spec.entrypoint) == ("demo", "frontend")
    assert [s.name for s in spec.services] == ["frontend", "orders", "payments", "inventory"]
    assert spec.service("frontend").calls == ("orders",)
    assert spec.service("orders").calls == ("payments", "inventory")
    assert [c.name for c in spec.callers_of("payments")] == ["orders"]
    for name in ("frontend", "orders", "inventory"):
        svc = spec.service(name)
        assert svc.instances == (Instance(f"{name}-1", "default"),)
        assert (svc.routes, svc.outlier_detection, svc.connect_timeout_s) == ((), None, 1.0)

    payments = spec.service("payments")
    assert payments.calls == ()
    assert payments.instances == (Instance("payments-v1-1", "v1"), Instance("payments-v2-1", "v2"))
    assert payments.subsets == ("v1", "v2")
    assert payments.connect_timeout_s == 1.0
    assert payments.circuit_breaker == CircuitBreaker(1024, 1024, 1024, 3)
    assert payments.outlier_detection == OutlierDetection(5, 10.0, 30.0, 50)
    assert payments.routes == (
        Route(
            name="default",
            match=RouteMatch(prefix="/"),
            split=(("v1", 100), ("v2", 0)),
            timeout_s=3.0,
            retries=RetryPolicy(attempts=2, retry_on=("5xx", "reset", "connect-failure"), per_try_timeout_s=1.0),
            fault=None,
        ),
    )


def test_demo_survives_a_load_and_dump_round_trip():
    # The end-to-end tests edit the demo as loaded YAML and write it back with safe_dump.
    assert parse_spec(yaml.safe_dump(yaml.safe_load(DEMO), sort_keys=False)) == parse_spec(DEMO)


def test_every_route_option_is_read():
    text = edit(
        "        match: {prefix: /}\n",
        "        match:\n"
        "          regex: ^/pay/[0-9]+$\n"
        "          headers: {X-Canary: 'yes', x-user: bob}\n"
        "        fault:\n"
        "          delay: {percent: 12.5, fixed: 250ms}\n"
        "          abort: {percent: 50, http_status: 503}\n",
    )
    text = edit("  inventory:\n", "  inventory:\n    routes:\n      - {name: by_path, match: {path: /stock}}\n", text)
    spec = parse_spec(text)
    route = spec.service("payments").routes[0]
    assert route.match == RouteMatch(regex="^/pay/[0-9]+$", headers=(("x-canary", "yes"), ("x-user", "bob")))
    assert route.fault == Fault(delay=FaultDelay(12.5, 0.25), abort=FaultAbort(50.0, 503))
    # A route without a split goes wholly to the service's only subset.
    assert spec.service("inventory").routes == (Route("by_path", RouteMatch(path="/stock"), (("default", 100),)),)


def test_optional_blocks_take_the_model_defaults():
    text = edit(block("    circuit_breaker:"), "    circuit_breaker: {max_connections: 7}\n")
    text = edit(block("    outlier_detection:", text), "    outlier_detection: {}\n", text)
    text = edit(block("        retries:", text), "        retries: {attempts: 0}\n", text)
    payments = parse_spec(text).service("payments")
    assert payments.circuit_breaker == CircuitBreaker(7, 1024, 1024, 3)
    assert payments.outlier_detection == OutlierDetection(5, 10.0, 30.0, 50)
    assert payments.routes[0].retries == RetryPolicy(0, ("5xx", "reset", "connect-failure"), None)


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("1.5s", 1.5), ("1m", 60.0), ("2h", 7200.0), ("1ms", 0.001)],
)
def test_durations(written: str, seconds: float):
    spec = parse_spec(edit("timeout: 3s", f"timeout: {written}"))
    assert spec.service("payments").routes[0].timeout_s == seconds


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("fast", "expected a duration like '250ms' or '2s', got 'fast'"),
        ("3", "expected a duration like '250ms' or '2s', got integer 3 (add a unit: '3s')"),
        ("1 s", "expected a duration like '250ms' or '2s', got '1 s'"),
        ("1d", "expected a duration like '250ms' or '2s', got '1d'"),
        ("-1s", "expected a duration like '250ms' or '2s', got '-1s'"),
        ("0s", "must be between 1ms and 24h, got '0s'"),
        ("0.5ms", "must be between 1ms and 24h, got '0.5ms'"),
        ("25h", "must be between 1ms and 24h, got '25h'"),
        ("", "expected a duration like '250ms' or '2s', got null"),
    ],
)
def test_bad_durations(written: str, message: str):
    text = edit("timeout: 3s", f"timeout: {written}")
    assert only_problem(text) == Problem("services.payments.routes[0].timeout", message, line_of(text, " timeout:"))


# --- each kind of mistake: path, line and message -----------------------------------


def test_split_to_a_missing_subset():
    text = edit("split: {v1: 100, v2: 0}", "split: {v1: 50, v3: 50}")
    assert only_problem(text) == Problem(
        "services.payments.routes[0].split.v3",
        "no instance of payments is in subset 'v3'; its subsets are: v1, v2",
        line_of(text, "split:"),
    )


def test_weights_must_sum_to_100():
    text = edit("split: {v1: 100, v2: 0}", "split: {v1: 80, v2: 10}")
    assert only_problem(text) == Problem(
        "services.payments.routes[0].split", "weights sum to 90; they must sum to exactly 100", line_of(text, "split:")
    )


def test_weights_are_integers_from_0_to_100():
    text = edit("split: {v1: 100, v2: 0}", "split: {v1: 110, v2: -10}")
    found = problems(text)
    assert [(p.path, p.message) for p in found] == [
        ("services.payments.routes[0].split.v1", "must be between 0 and 100, got 110"),
        ("services.payments.routes[0].split.v2", "must be between 0 and 100, got -10"),
    ]


def test_a_route_without_split_needs_a_single_subset():
    text = edit(block("        split:"), "")
    assert only_problem(text) == Problem(
        "services.payments.routes[0].split",
        "service payments has subsets v1, v2: give the route a split",
        line_of(text, "- name: default"),
    )


def test_unknown_key_suggests_the_close_one():
    text = edit("timeout: 3s", "timout: 3s")
    assert only_problem(text) == Problem(
        "services.payments.routes[0].timout", "unknown key 'timout' (did you mean 'timeout'?)", line_of(text, "timout")
    )


def test_unknown_key_without_a_close_one_lists_the_keys():
    text = edit("mesh: demo", "mesh: demo\ncolour: blue")
    assert only_problem(text) == Problem(
        "colour",
        "unknown key 'colour'; expected one of: version, mesh, entrypoint, identity, ingress, services, alerts, actions",
        line_of(text, "colour"),
    )


def test_bad_duration_in_a_service_block():
    text = edit("interval: 10s", "interval: fast")
    assert only_problem(text) == Problem(
        "services.payments.outlier_detection.interval",
        "expected a duration like '250ms' or '2s', got 'fast'",
        line_of(text, "interval:"),
    )


def test_instance_names_are_unique_across_the_mesh():
    text = edit("- name: inventory-1", "- name: orders-1")
    problem = only_problem(text)
    assert (problem.path, problem.line) == ("services.inventory.instances[0].name", line_of(text, "inventory:") + 2)
    assert problem.message == (
        "duplicate instance name 'orders-1': already at services.orders.instances[0].name "
        f"(line {line_of(text, 'calls: [payments, inventory]') + 2})"
    )


def test_calls_to_an_unknown_service():
    text = edit("calls: [payments, inventory]", "calls: [payments, inventry]")
    assert only_problem(text) == Problem(
        "services.orders.calls[1]", "unknown service 'inventry' (did you mean 'inventory'?)", line_of(text, "inventry")
    )


def test_calls_are_distinct_and_never_to_itself():
    text = edit("calls: [payments, inventory]", "calls: [payments, orders, payments]")
    assert [(p.path, p.message) for p in problems(text)] == [
        ("services.orders.calls[1]", "orders cannot call itself"),
        ("services.orders.calls[2]",
         f"duplicate callee 'payments': already at services.orders.calls[0] (line {line_of(text, '[payments,')})"),
    ]


def test_duplicate_key():
    text = edit("connect_timeout: 1s\n", "connect_timeout: 1s\n    connect_timeout: 2s\n")
    first = line_of(text, "connect_timeout: 1s")
    assert only_problem(text) == Problem(
        "services.payments.connect_timeout", f"duplicate key 'connect_timeout' (first at line {first})", first + 1
    )


def test_yaml_syntax_error_has_its_line():
    text = edit("mesh: demo", "mesh: demo: oops")
    assert only_problem(text) == Problem("", "invalid YAML: mapping values are not allowed here", line_of(text, "oops"))
    text = edit("mesh: demo", "mesh: de\x00mo")
    assert only_problem(text) == Problem("", "invalid YAML: character #x0000 is not allowed", line_of(text, "mesh:"))
    assert only_problem("mesh: " + "[" * 5000) == Problem("", "invalid YAML: nested too deeply")


def test_entrypoint_must_be_a_service():
    text = edit("entrypoint: frontend", "entrypoint: nowhere")
    assert only_problem(text) == Problem(
        "entrypoint",
        "unknown service 'nowhere'; expected one of: frontend, orders, payments, inventory",
        line_of(text, "entrypoint:"),
    )


def test_missing_required_keys_are_placed_at_their_mapping():
    text = edit("mesh: demo\n", "")
    assert only_problem(text) == Problem("mesh", "required key is missing", line_of(text, "version: 1"))
    text = edit("- {name: payments-v2-1, subset: v2}", "- {subset: v2}")
    assert only_problem(text) == Problem(
        "services.payments.instances[1].name", "required key is missing", line_of(text, "{subset: v2}")
    )


def test_strings_that_yaml_reads_as_other_types_say_how_to_quote():
    text = edit("subset: v2}", "subset: 2}")
    assert only_problem(text) == Problem(
        "services.payments.instances[1].subset", 'expected a string, got integer 2 (quote it: "2")',
        line_of(text, "subset: 2"),
    )


def test_names_are_dns_labels():
    text = edit("mesh: demo", "mesh: Demo_Mesh")
    problem = only_problem(text)
    assert (problem.path, problem.line) == ("mesh", line_of(text, "Demo_Mesh"))
    assert problem.message.startswith("'Demo_Mesh' is not a valid name: use lowercase letters, digits and '-'")


@pytest.mark.parametrize(
    ("match", "path", "message"),
    [
        ("{prefix: /, regex: /x}", "match", "give exactly one of prefix, path or regex (got prefix and regex)"),
        ("{headers: {x-a: b}}", "match", "give exactly one of prefix, path or regex (got none)"),
        ("{prefix: pay}", "match.prefix", "must start with '/', got 'pay'"),
        ("{regex: '(unclosed'}", "match.regex",
         "not a valid regular expression: missing ), unterminated subpattern at position 0"),
        ("{regex: 'a{99999999999}'}", "match.regex",
         "not a valid regular expression: the repetition number is too large"),
        ("{prefix: /, headers: {'bad name': x}}", "match.headers.bad name",
         "'bad name' is not a valid header name: use letters, digits and !#$%&'*+-.^_`|~ "
         "(':' first for a pseudo-header)"),
    ],
)
def test_route_matches(match: str, path: str, message: str):
    text = edit("match: {prefix: /}", f"match: {match}")
    assert only_problem(text) == Problem(f"services.payments.routes[0].{path}", message, line_of(text, "match:"))


def test_header_names_are_case_insensitive():
    text = edit("match: {prefix: /}", "match: {prefix: /, headers: {X-Canary: a, x-canary: b}}")
    line = line_of(text, "X-Canary")
    assert only_problem(text) == Problem(
        "services.payments.routes[0].match.headers.x-canary",
        f"duplicate header 'x-canary': already at services.payments.routes[0].match.headers.X-Canary (line {line})",
        line,
    )


def test_retry_policy_limits():
    text = edit("attempts: 2", "attempts: 11")
    text = edit("retry_on: [5xx, reset, connect-failure]", "retry_on: [5xxx, reset]", text)
    assert [(p.path, p.message) for p in problems(text)] == [
        ("services.payments.routes[0].retries.attempts", "must be between 0 and 10, got 11"),
        ("services.payments.routes[0].retries.retry_on[0]", "unknown retry condition '5xxx' (did you mean '5xx'?)"),
    ]


@pytest.mark.parametrize(
    ("fault", "path", "message"),
    [
        ("{}", "fault", "give a delay, an abort or both"),
        ("{abort: {percent: 50, http_status: 600}}", "fault.abort.http_status", "must be between 200 and 599, got 600"),
        ("{abort: {percent: 101, http_status: 503}}", "fault.abort.percent", "must be between 0 and 100, got 101"),
        ("{delay: {percent: 10}}", "fault.delay.fixed", "required key is missing"),
    ],
)
def test_faults(fault: str, path: str, message: str):
    text = edit("timeout: 3s\n", f"timeout: 3s\n        fault: {fault}\n")
    line = line_of(text, f"fault: {fault}")
    assert only_problem(text) == Problem(f"services.payments.routes[0].{path}", message, line)


def test_version_must_be_the_supported_one():
    text = edit("version: 1", "version: 2")
    message = "unsupported version 2: this greymesh reads version 1"
    assert only_problem(text) == Problem("version", message, line_of(text, "version:"))


def test_a_service_needs_instances():
    text = edit(block("    instances:", block("  inventory:")), "    instances: []\n")
    assert only_problem(text) == Problem(
        "services.inventory.instances", "give at least one instance", line_of(text, "instances: []")
    )


def test_empty_null_and_non_mapping_documents():
    assert only_problem("# nothing yet\n") == Problem(
        "", "the file is empty: expected a mapping of version, mesh, entrypoint, services"
    )
    assert only_problem("\n- frontend\n") == Problem("", "expected a mapping, got a list", 2)
    null_block = edit(block("    outlier_detection:"), "    outlier_detection:\n")
    assert only_problem(null_block) == Problem(
        "services.payments.outlier_detection", "expected a mapping, got null (write {} for an empty one)",
        line_of(null_block, "outlier_detection:"),
    )


def test_merge_keys_are_refused_rather_than_half_understood():
    text = edit("  inventory:\n", "  inventory:\n    <<: {connect_timeout: 2s}\n")
    assert only_problem(text) == Problem(
        "services.inventory.<<", "YAML merge keys ('<<') are not supported: write the keys out", line_of(text, "<<")
    )


# --- reporting ----------------------------------------------------------------------


def test_all_problems_are_reported_together_in_file_order():
    text = edit("entrypoint: frontend", "entrypoint: nowhere")
    text = edit("split: {v1: 100, v2: 0}", "split: {v1: 50, v3: 40}", text)
    text = edit("timeout: 3s", "timout: 3s", text)
    text = edit("- name: inventory-1", "- {name: frontend-1}", text)
    text = edit("max_retries: 3", "max_retries: 0", text)
    assert [(p.line, p.path) for p in problems(text)] == [
        (line_of(text, "entrypoint:"), "entrypoint"),
        (line_of(text, "max_retries"), "services.payments.circuit_breaker.max_retries"),
        (line_of(text, "split:"), "services.payments.routes[0].split.v3"),
        (line_of(text, "timout"), "services.payments.routes[0].timout"),
        (line_of(text, "{name: frontend-1}"), "services.inventory.instances[0].name"),
    ]


def test_spec_error_renders_file_line_path_message(tmp_path: Path):
    bad = tmp_path / "mesh.yaml"
    bad.write_text(edit("timeout: 3s", "timeout: soon"))
    with pytest.raises(SpecError) as info:
        load_spec(bad)
    line = line_of(bad.read_text(), " timeout:")
    assert str(info.value).splitlines() == [
        f"{bad}:{line}: services.payments.routes[0].timeout: expected a duration like '250ms' or '2s', got 'soon'"
    ]
    assert info.value.source == str(bad)


def test_problems_without_a_path_or_line_render_without_them():
    assert Problem("", "cannot read file: gone", None).render("m.yaml") == "m.yaml: cannot read file: gone"
    assert Problem("", "invalid YAML: x", 3).render("m.yaml") == "m.yaml:3: invalid YAML: x"


# --- robustness ---------------------------------------------------------------------

_FRAGMENTS = [":", "-", " ", "  ", "\t", "\n", "{", "}", "[", "]", ",", '"', "'", "#", "&a ", "*a", "!!int ",
              "!!str ", "!!timestamp ", "!foo ", "<<: ", "? ", "|", ">", "0", "1e400", ".nan", "~", "null",
              "yes", "0x1f", "x" * 50, "é", "\x00", "/", "(", "v3", "ms", "s"]


def _mutate(text: str, rng: random.Random) -> str:
    lines = text.splitlines(keepends=True)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(5)
        i = rng.randrange(len(lines))
        if kind == 0:  # insert a fragment
            at = rng.randint(0, len(lines[i]))
            lines[i] = lines[i][:at] + rng.choice(_FRAGMENTS) + lines[i][at:]
        elif kind == 1:  # delete a few characters
            at = rng.randint(0, len(lines[i]))
            lines[i] = lines[i][:at] + lines[i][at + rng.randint(1, 6):]
        elif kind == 2:  # duplicate a line
            lines.insert(i, lines[i])
        elif kind == 3:  # drop a line
            del lines[i]
            lines = lines or ["\n"]
        else:  # re-indent a line
            lines[i] = " " * rng.randrange(10) + lines[i].lstrip(" ")
    return "".join(lines)


_ODD_VALUES = [None, 0, -1, 101, 2**40, 1.5, float("nan"), True, "", "x", "Bad Name", "1s", "0ms", "v3", "/",
               [], {}, ["orders"], {"v1": 100}, {"name": "z"}, [{"name": "payments-v1-1"}]]
_ODD_KEYS = ["name", "split", "timeout", "subset", "extra", "retry_on", "fault", "headers", "calls"]


def _mutate_tree(doc: object, rng: random.Random) -> object:
    """The loaded demo with one mapping value or list item replaced, removed or joined by a stray key."""
    parent, key = doc, None
    while True:  # walk down to a random container
        children = list(parent.items()) if isinstance(parent, dict) else list(enumerate(parent))
        if not children:
            break
        key, child = rng.choice(children)
        if not isinstance(child, dict | list) or rng.random() < 0.3:
            break
        parent = child
    action = rng.randrange(3)
    if key is None or action == 0:
        if isinstance(parent, dict):
            parent[rng.choice(_ODD_KEYS)] = rng.choice(_ODD_VALUES)
        else:
            parent.append(rng.choice(_ODD_VALUES))
    elif action == 1:
        del parent[key]
    else:
        parent[key] = rng.choice(_ODD_VALUES)
    return doc


def _check_outcome(text: str) -> bool:
    """Parse `text`; True if it was refused (with well-formed problems), False if accepted."""
    try:
        assert isinstance(parse_spec(text), MeshSpec)
        return False
    except SpecError as exc:
        assert exc.problems, text
        last_line = text.count("\n") + 1
        for p in exc.problems:
            assert p.message and "\n" not in p.message and "\n" not in p.path, (p, text)
            assert p.line is None or 1 <= p.line <= last_line, (p, text)
        lines = [p.line or 0 for p in exc.problems]
        assert lines == sorted(lines)
        return True


def test_random_text_mutations_of_the_demo_give_a_spec_or_a_spec_error():
    rng = random.Random(20240611)
    refused = sum(_check_outcome(_mutate(DEMO, rng)) for _ in range(1000))
    assert refused > 500  # the mutations do break things, so the refusal path is what was exercised


def test_random_value_mutations_of_the_demo_give_a_spec_or_a_spec_error():
    rng, demo = random.Random(7), yaml.safe_load(DEMO)
    texts = [yaml.safe_dump(_mutate_tree(copy.deepcopy(demo), rng), sort_keys=False) for _ in range(600)]
    assert sum(map(_check_outcome, texts)) > 300


# --- identity and authorization fields ---------------------------------------------


def test_identity_namespace_tags_and_fail_open_are_read():
    text = edit("mesh: demo", "mesh: demo\nidentity: {trust_domain: prod.example.com, svid_lifetime: 90m}")
    text = edit("  payments:\n", "  payments:\n    namespace: billing\n    tags: [pci, 'gdpr-region:eu']\n"
                "    authz: {fail_open: true}\n", text)
    spec = parse_spec(text)
    assert (spec.identity.trust_domain, spec.identity.svid_lifetime_s) == ("prod.example.com", 5400.0)
    payments = spec.service("payments")
    assert (payments.namespace, payments.tags, payments.fail_open) == ("billing", ("pci", "gdpr-region:eu"), True)
    orders = spec.service("orders")
    assert (orders.namespace, orders.tags, orders.fail_open) == ("default", (), False)


@pytest.mark.parametrize(
    ("field", "written", "message"),
    [
        # 1 ms re-issues SVIDs in a busy loop (a mesh-wide outage); ten years keeps a stolen key for ten years
        ("identity.svid_lifetime", "1ms", "must be between 1m and 720h, got '1ms'"),
        ("identity.svid_lifetime", "59s", "must be between 1m and 720h, got '59s'"),
        ("identity.svid_lifetime", "87600h", "must be between 1m and 720h, got '87600h'"),
    ],
)
def test_svid_lifetime_is_bounded_with_file_and_line(tmp_path: Path, field: str, written: str, message: str):
    bad = tmp_path / "mesh.yaml"
    text = edit("mesh: demo", f"mesh: demo\nidentity:\n  svid_lifetime: {written}")
    bad.write_text(text)
    with pytest.raises(SpecError) as err:
        load_spec(bad)
    assert str(err.value) == f"{bad}:{line_of(text, 'svid_lifetime')}: {field}: {message}"


def test_outlier_sweeps_and_fault_delays_are_bounded():
    text = edit("  payments:\n", "  payments:\n    outlier_detection: {interval: 1ms}\n")
    with pytest.raises(SpecError, match=r"services\.payments\.outlier_detection\.interval: must be between 100ms and 1h"):
        parse_spec(text)
    text = edit("timeout: 3s\n", "timeout: 3s\n        fault: {delay: {percent: 10, fixed: 2h}}\n")
    with pytest.raises(SpecError, match=r"fault\.delay\.fixed: must be between 1ms and 1h, got '2h'"):
        parse_spec(text)


def test_bad_trust_domain_and_fail_open_are_reported_with_lines():
    text = edit("mesh: demo", "mesh: demo\nidentity:\n  trust_domain: Bad_Domain")
    text = edit("  payments:\n", "  payments:\n    authz: {fail_open: sometimes}\n", text)
    found = {p.path: p for p in problems(text)}
    assert found["identity.trust_domain"].line == line_of(text, "trust_domain")
    assert "not a valid trust domain" in found["identity.trust_domain"].message
    assert found["services.payments.authz.fail_open"].message == "expected true or false, got 'sometimes'"
