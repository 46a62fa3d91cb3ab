"""mesh.yaml's alerts: and actions: sections: the example parses into core/loopspec's types,
and every mistake is named as file:line: key.path: reason, secrets never echoed."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.meshspec import parse_spec
from core.loopspec import (
    ActionsSpec,
    AlertRoute,
    AlertsSpec,
    LoopSpec,
    PagerDutyReceiver,
    Receiver,
    RoutingSpec,
    ScalingSpec,
    SecretRef,
    SlackReceiver,
    parse_loop,
)
from core.specread import Problem, SpecError

DEMO = (Path(__file__).resolve().parents[1] / "deploy" / "demo" / "mesh.yaml").read_text(encoding="utf-8")
SOURCE = "/etc/greymesh/mesh.yaml"

# The example, with the services it names (parse_loop reads their names from the spec).
FULL = """\
services: {payments: {}, orders: {}}
alerts:
  group_wait: 30s
  group_interval: 5m
  repeat_interval: 4h
  receivers:
    oncall: {pagerduty: {routing_key_file: /etc/greymesh/pd.secret}}
    chat: {slack: {webhook_url_env: SLACK_WEBHOOK}}
  routes:
    - {services: [payments], severities: [critical, error], receivers: [oncall, chat]}
    - {receivers: [chat]}
actions:
  mode: shadow
  services: {payments: {mode: on}, orders: {mode: off}}
  freeze: false
  hold_down: 20s
  budget: {per_service_hour: 6, per_mesh_hour: 20}
  routing: {step: 25, floor: 0, restore_after: 60s, min_samples: 20, latency_ratio: 1.5, error_rate_delta: 0.05,
            p_value: 0.01}
  scaling: {max_instances: 4, stabilization: 300s, ttl: 30m}
"""

EXPECTED = LoopSpec(
    alerts=AlertsSpec(
        receivers=(
            Receiver("oncall", pagerduty=PagerDutyReceiver(routing_key=SecretRef(file="/etc/greymesh/pd.secret"))),
            Receiver("chat", slack=SlackReceiver(webhook_url=SecretRef(env="SLACK_WEBHOOK"))),
        ),
        routes=(
            AlertRoute(receivers=("oncall", "chat"), services=("payments",), severities=("critical", "error")),
            AlertRoute(receivers=("chat",)),
        ),
        group_wait_s=30.0,
        group_interval_s=300.0,
        repeat_interval_s=14400.0,
    ),
    actions=ActionsSpec(
        mode="shadow",
        modes=(("payments", "on"), ("orders", "off")),
        freeze=False,
        hold_down_s=20.0,
        budget_per_service_hour=6,
        budget_per_mesh_hour=20,
        routing=RoutingSpec(step_percent=25, floor_percent=0, restore_after_s=60.0, min_samples=20,
                            latency_ratio=1.5, error_rate_delta=0.05, p_value=0.01),
        scaling=ScalingSpec(max_instances=4, stabilization_s=300.0, ttl_s=1800.0),
    ),
)


def edit(old: str, new: str, text: str = FULL) -> str:
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)


def line_of(text: str, needle: str) -> int:
    lines = [n for n, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(lines) == 1, f"{needle!r} is on lines {lines}"
    return lines[0]


def problems(text: str) -> list[Problem]:
    with pytest.raises(SpecError) as exc:
        parse_loop(text, SOURCE)
    return exc.value.problems


def only_problem(text: str) -> Problem:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


# --- what parses ----------------------------------------------------------------------


def test_the_full_example_parses_into_the_types():
    assert parse_loop(FULL, SOURCE) == EXPECTED


def test_absent_sections_are_the_defaults_shadow_mode_and_no_receivers():
    loop = parse_loop("services: {payments: {}}\n", SOURCE)
    assert loop == LoopSpec()
    assert (loop.actions.mode, loop.actions.mode_of("payments"), loop.alerts.receivers) == ("shadow", "shadow", ())


def test_a_spec_without_the_sections_gets_the_defaults():
    demo_without = DEMO[: DEMO.index("\nactions:")]
    assert parse_spec(demo_without).loop == LoopSpec()


def test_the_demo_states_the_defaults_and_its_commented_alerts_example_is_valid():
    assert parse_spec(DEMO).loop == LoopSpec()
    start = DEMO.index("# alerts:")
    example = "\n".join(line.removeprefix("# ") for line in DEMO[start:].splitlines())
    spec = parse_spec(DEMO[:start] + example + "\n")
    assert [r.name for r in spec.loop.alerts.receivers] == ["oncall", "chat"]
    assert spec.loop.alerts.routes[0] == AlertRoute(("oncall", "chat"), ("payments",), ("critical", "error"))


def test_meshspec_reads_the_sections_and_checks_service_names_against_its_services():
    spec = parse_spec(DEMO + "  services: {payments: {mode: on}}\n")
    assert spec.loop.actions.modes == (("payments", "on"),)
    assert spec.loop.actions.mode_of("payments") == "on" and spec.loop.actions.mode_of("orders") == "shadow"


def test_on_and_off_are_modes_though_yaml_1_1_reads_them_as_booleans():
    loop = parse_loop(edit("mode: shadow", "mode: off"), SOURCE)
    assert loop.actions.mode == "off" and loop.actions.mode_of("payments") == "on"


def test_a_test_receiver_may_be_plain_http_on_loopback():
    text = edit("{routing_key_file: /etc/greymesh/pd.secret}",
                "{routing_key_env: PD_KEY, url: 'http://127.0.0.1:8099/v2/enqueue', "
                "change_url: 'http://[::1]:8099/v2/change/enqueue'}")
    pd = parse_loop(text, SOURCE).alerts.receivers[0].pagerduty
    assert pd == PagerDutyReceiver(SecretRef(env="PD_KEY"), "http://127.0.0.1:8099/v2/enqueue",
                                   "http://[::1]:8099/v2/change/enqueue")


# --- what is refused, and where -------------------------------------------------------


@pytest.mark.parametrize(("old", "new", "needle", "path", "message"), [
    ("receivers: [chat]}", "receivers: [chatt]}", "[chatt]", "alerts.routes[1].receivers[0]",
     "unknown receiver 'chatt' (did you mean 'chat'?)"),
    ("{payments: {mode: on}, orders: {mode: off}}", "{payment: {mode: on}}", "payment:", "actions.services.payment",
     "unknown service 'payment' (did you mean 'payments'?)"),
    ("services: [payments]", "services: [billing]", "[billing]", "alerts.routes[0].services[0]",
     "unknown service 'billing'; expected one of: payments, orders"),
    ("severities: [critical, error]", "severities: [critical, fatal]", "fatal", "alerts.routes[0].severities[1]",
     "unknown severity 'fatal'; expected one of: critical, error, warning, info"),
    ("hold_down: 20s", "hold_down: 10s", "hold_down", "actions.hold_down",
     "must be at least 20s (two 10s analysis windows), got 10s: a step's effect must show in a whole window "
     "before the next step is judged"),
    ("mode: shadow", "mode: true", "mode: true", "actions.mode",
     "unknown mode 'true'; expected one of: off, shadow, on"),
    ("mode: shadow", "mode: auto", "mode: auto", "actions.mode",
     "unknown mode 'auto'; expected one of: off, shadow, on"),
    ("step: 25", "step: 0", "routing:", "actions.routing.step", "must be between 1 and 100, got 0"),
    ("floor: 0", "floor: 100", "routing:", "actions.routing.floor", "must be between 0 and 99, got 100"),
    ("p_value: 0.01", "p_value: 0", "p_value", "actions.routing.p_value", "must be between 0.0001 and 0.5, got 0"),
    ("stabilization: 300s", "stabilization: 300", "scaling:", "actions.scaling.stabilization",
     "expected a duration like '250ms' or '2s', got integer 300 (add a unit: '300s')"),
    ("freeze: false", "freeze: maybe", "freeze", "actions.freeze", "expected true or false, got 'maybe'"),
    ("budget: {per_service_hour: 6,", "budget: {per_service_hour: 0,", "budget", "actions.budget.per_service_hour",
     "must be between 1 and 10000, got 0"),
    ("  freeze: false\n", "  freez: true\n", "freez", "actions.freez", "unknown key 'freez' (did you mean 'freeze'?)"),
    ("repeat_interval: 4h", "repeat_interval: 1m", "repeat_interval", "alerts.repeat_interval",
     "repeat_interval (60s) is shorter than group_interval (300s): a still-firing group would be re-sent before "
     "its changes are; make it at least as long"),
    ("chat: {slack: {webhook_url_env: SLACK_WEBHOOK}}",
     "chat: {slack: {webhook_url_env: A}, pagerduty: {routing_key_env: B}}", "chat:", "alerts.receivers.chat",
     "give exactly one of slack or pagerduty (got slack and pagerduty)"),
    ("chat: {slack: {webhook_url_env: SLACK_WEBHOOK}}", "chat: {}", "chat:", "alerts.receivers.chat",
     "give exactly one of slack or pagerduty (got none)"),
    ("{webhook_url_env: SLACK_WEBHOOK}", "{webhook_url_env: SLACK_WEBHOOK, webhook_url_file: /run/slack}", "chat:",
     "alerts.receivers.chat.slack", "give exactly one of webhook_url_file or webhook_url_env (got webhook_url_file "
     "and webhook_url_env)"),
    ("    chat:", "    On-Call: {slack: {webhook_url_env: X}}\n    chat:", "On-Call", "alerts.receivers.On-Call",
     "'On-Call' is not a valid receiver name: use lowercase letters, digits, '-' and '_', like 'oncall' or "
     "'team-chat'"),
    ("routes:\n", "routes:\n    - {receivers: [oncall]}\n", "[oncall]}", "alerts.routes",
     "routes after [0] are never used: it matches every alert and the first match wins; move it last"),
    ("{receivers: [chat]}", "{receivers: []}", "receivers: []", "alerts.routes[1].receivers",
     "give at least one receiver"),
    ("{receivers: [chat]}", "{severities: [info]}", "severities: [info]", "alerts.routes[1].receivers",
     "required key is missing"),
])
def test_each_refusal_names_the_line_and_the_key_path(old, new, needle, path, message):
    text = edit(old, new)
    problem = only_problem(text)
    assert problem == Problem(path, message, line_of(text, needle))
    with pytest.raises(SpecError) as exc:
        parse_loop(text, SOURCE)
    assert str(exc.value) == f"{SOURCE}:{problem.line}: {path}: {message}"


def test_every_problem_is_reported_at_once_in_line_order():
    text = edit("hold_down: 20s", "hold_down: 5s", edit("receivers: [chat]}", "receivers: [nobody]}",
                                                         edit("group_wait: 30s", "group_wait: soon")))
    found = problems(text)
    assert [(p.path, p.line) for p in found] == [
        ("alerts.group_wait", line_of(text, "group_wait")),
        ("alerts.routes[1].receivers[0]", line_of(text, "nobody")),
        ("actions.hold_down", line_of(text, "hold_down")),
    ]


def test_a_bad_section_refuses_the_whole_spec():
    with pytest.raises(SpecError) as exc:
        parse_spec(DEMO.replace("step: 25", "step: 250"), SOURCE)
    assert [p.path for p in exc.value.problems] == ["actions.routing.step"]
    with pytest.raises(SpecError) as exc:
        parse_spec(DEMO + "  services: {checkout: {mode: on}}\n", SOURCE)
    assert [(p.path, p.message) for p in exc.value.problems] == [
        ("actions.services.checkout",
         "unknown service 'checkout'; expected one of: frontend, orders, payments, inventory"),
    ]


# --- secrets ----------------------------------------------------------------------------

SECRET = "T0000/B0000/XXXXsecretXXXX"


@pytest.mark.parametrize(("old", "new", "path", "says"), [
    ("{webhook_url_env: SLACK_WEBHOOK}", f"{{webhook_url: 'https://hooks.slack.com/services/{SECRET}'}}",
     "alerts.receivers.chat.slack.webhook_url", "give webhook_url_file: /absolute/path"),
    ("{routing_key_file: /etc/greymesh/pd.secret}", f"{{routing_key: {SECRET}}}",
     "alerts.receivers.oncall.pagerduty.routing_key", "give routing_key_env: NAME"),
])
def test_a_literal_secret_is_refused_and_never_echoed(old, new, path, says):
    text = edit(old, new)
    problem = only_problem(text)
    assert problem.path == path and problem.line == line_of(text, SECRET)
    assert "is a secret and must not be written in the spec" in problem.message and says in problem.message
    with pytest.raises(SpecError) as exc:
        parse_loop(text, SOURCE)
    assert "XXXX" not in str(exc.value)
    with pytest.raises(SpecError) as exc:  # the same through the whole spec
        parse_spec(DEMO.replace("# alerts:", "alerts:\n  receivers:\n    r: {slack: {webhook_url: " + SECRET + "}}"))
    assert "XXXX" not in str(exc.value) and "receivers.r.slack.webhook_url" in str(exc.value)


@pytest.mark.parametrize(("old", "new", "path"), [
    ("webhook_url_env: SLACK_WEBHOOK", f"webhook_url_env: 'https://hooks.slack.com/services/{SECRET}'",
     "alerts.receivers.chat.slack.webhook_url_env"),
    ("routing_key_file: /etc/greymesh/pd.secret", f"routing_key_file: {SECRET}",
     "alerts.receivers.oncall.pagerduty.routing_key_file"),
    ("routing_key_file: /etc/greymesh/pd.secret", "routing_key_env: 123456789XXXX9",
     "alerts.receivers.oncall.pagerduty.routing_key_env"),
    ("routing_key_file: /etc/greymesh/pd.secret", "routing_key_env: 1234567890123",
     "alerts.receivers.oncall.pagerduty.routing_key_env"),
    ("routing_key_file: /etc/greymesh/pd.secret",
     "routing_key_env: K, url: 'https://u:XXXXpassXXXX@events.pagerduty.com/v2/enqueue'",
     "alerts.receivers.oncall.pagerduty.url"),
])
def test_a_secret_in_the_wrong_field_is_refused_and_never_echoed(old, new, path):
    text = edit(old, new)
    problem = only_problem(text)
    assert problem.path == path
    assert "not shown" in problem.message
    assert "XXXX" not in problem.message and "1234567890123" not in problem.message


def test_events_go_over_https_except_to_loopback():
    text = edit("routing_key_file: /etc/greymesh/pd.secret",
                "routing_key_env: K, url: 'http://events.example.com/v2/enqueue'")
    assert only_problem(text) == Problem(
        "alerts.receivers.oncall.pagerduty.url",
        "use https (plain http only to a loopback address, for a test receiver), got http to events.example.com",
        line_of(text, "events.example.com"))
