"""`greymesh actions ...` and `greymesh alerts ...`: the loop's decisions and the alerts, through
the actions process's loopback API (actions/service.py), with the CLI's token.

Every command that changes something (revert, mode, freeze, silence) is recorded by the
actions process as a decision with the CLI as its author, so the audit stream shows who
overrode the loop and when.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from core import credentials, jsonhttp
from core.datadir import DataDir
from core.endpoints import ACTIONS_HTTP, Endpoints
from core.errors import NotRunning
from core.loopspec import MAX_SILENCE_S, MODES
from core.specread import duration_seconds


def register(sub: Any, data_dir: Callable[[argparse.ArgumentParser], None]) -> None:
    actions = sub.add_parser("actions", help="the loop's decisions: list, show, revert; modes and the freeze",
                             description="What the actions stage decided and did (docs/actions.md).")
    asub = actions.add_subparsers(required=True, metavar="ACTION")

    def cmd(parent: Any, name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:  # noqa: A002
        sp = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(func=fn)
        data_dir(sp)
        return sp

    sp = cmd(asub, "list", _list, "decisions, newest first (acted, shadowed, held, refused, failed)")
    sp.add_argument("--service")
    sp.add_argument("--limit", type=int, default=20)
    sp.add_argument("--json", action="store_true", help="one JSON decision per line")
    sp = cmd(asub, "show", _show, "one decision with its evidence")
    sp.add_argument("id")
    sp = cmd(asub, "revert", _revert, "undo what a decision changed (weights or instances)")
    sp.add_argument("id")
    sp = cmd(asub, "mode", _mode, "set a service's mode: off, shadow (record only) or on")
    sp.add_argument("service")
    sp.add_argument("mode", choices=MODES)
    cmd(asub, "freeze", _freeze, "stop every automated change mesh-wide (decisions are still recorded)")
    cmd(asub, "unfreeze", _unfreeze, "end the freeze")

    alerts = sub.add_parser("alerts", help="alerts: firing ones, silences, receivers; send a test",
                            description="Alerts to Slack and PagerDuty (docs/actions.md).")
    lsub = alerts.add_subparsers(required=True, metavar="ACTION")
    sp = cmd(lsub, "list", _alerts, "firing alerts, silences and each receiver's state")
    sp.add_argument("--json", action="store_true")
    sp = cmd(lsub, "silence", _silence, "mute alerts of a service and/or kind for a while")
    sp.add_argument("--service", help="only this service's alerts (default: any)")
    sp.add_argument("--kind", help="only this kind: latency, errors, load, loop_blind, ... (default: any)")
    sp.add_argument("--for", dest="duration", default="1h", help="how long: 30m, 2h, 48h (default: %(default)s)")
    sp.add_argument("--comment", required=True, help="why, for whoever wonders later")
    sp = cmd(lsub, "unsilence", _unsilence, "end a silence now")
    sp.add_argument("id")
    sp = cmd(lsub, "test", _test, "send a test message to a receiver named in mesh.yaml")
    sp.add_argument("receiver")


def _api(args: argparse.Namespace, path: str, body: dict | None = None) -> dict:
    dd = DataDir(args.data_dir)
    url = Endpoints.require(dd, ACTIONS_HTTP, "actions").url(ACTIONS_HTTP) + path
    try:
        return jsonhttp.call(url, body, token=credentials.read(dd.api_token), timeout_s=60)
    except jsonhttp.Unreachable:
        raise NotRunning(f"the actions process at {url} is not reachable; is the mesh up? (`greymesh status`)") \
            from None


def _age(at_us: int) -> str:
    seconds = max(0, time.time() - at_us / 1e6)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago" if seconds < 7200 \
        else f"{seconds / 3600:.1f}h ago"


def _line(d: dict) -> str:
    change = f"{d['before']} -> {d['after']}" if d["after"] not in ("", "{}", "null") else ""
    rail = f" [{d['guardrail']}]" if d["guardrail"] else ""
    return (f"{d['event_id']}  {_age(d['time_us']):>8}  {d['service']:<12} {d['action']:<15} "
            f"{d['outcome']:<9}{rail} {change}  {d['reason']}").rstrip()


def _list(args: argparse.Namespace) -> int:
    query = f"/decisions?limit={args.limit}" + (f"&service={quote(args.service)}" if args.service else "")
    decisions = _api(args, query)["decisions"]
    for d in decisions:
        print(json.dumps(d) if args.json else _line(d))
    if not decisions and not args.json:
        print("no decisions yet")
    return 0


def _show(args: argparse.Namespace) -> int:
    d = _api(args, f"/decisions/{quote(args.id)}")["decision"]
    print(_line(d))
    for key in ("anomaly_id", "verdict", "mode", "override_id", "by"):
        print(f"  {key}: {d[key] or '-'}")
    print("  evidence:")
    print("    " + json.dumps(json.loads(d["evidence"] or "{}"), indent=2).replace("\n", "\n    "))
    return 0


def _revert(args: argparse.Namespace) -> int:
    d = _api(args, "/revert", {"id": args.id})["decision"]
    print(_line(d))
    return 0 if d["outcome"] == "acted" else 1


def _mode(args: argparse.Namespace) -> int:
    doc = _api(args, "/mode", {"service": args.service, "mode": args.mode})
    print(f"{doc['service']}: mode {doc['mode']}")
    return 0


def _freeze(args: argparse.Namespace) -> int:
    _api(args, "/freeze", {})
    print("frozen: no automated change until `greymesh actions unfreeze`")
    return 0


def _unfreeze(args: argparse.Namespace) -> int:
    _api(args, "/unfreeze", {})
    print("unfrozen")
    return 0


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _alerts(args: argparse.Namespace) -> int:
    doc = _api(args, "/alerts")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    alerts, receivers = doc["alerts"], doc["receivers"]
    print("firing:" if alerts["firing"] else "firing: none")
    for a in alerts["firing"]:
        muted = f"  ({a['muted']})" if a["muted"] else ""
        print(f"  {a['key']:<24} {a['severity']:<8} since {_when(a['since'])} -> "
              f"{', '.join(a['receivers']) or 'no receiver'}{muted}\n    {a['summary']}")
    print("silences:" if alerts["silences"] else "silences: none")
    for s in alerts["silences"]:
        print(f"  {s['id']}  service={s['service'] or '*'} kind={s['kind'] or '*'} until {_when(s['ends_at'])} "
              f"by {s['created_by']}: {s['comment']}")
    print("receivers:" if receivers else "receivers: none configured (mesh.yaml `alerts:`)")
    for r in receivers:
        line = (f"  {r['name']:<16} {r['type']:<10} {r['state']:<8} sent {r['sent']} queued {r['queued']} "
                f"failed {r['failed']} dropped {r['dropped']}")
        print(line + (f"\n    {'broken' if r['state'] == 'broken' else 'last error'}: {r['error']}"
                      if r["error"] else ""))
    return 0


def _silence(args: argparse.Namespace) -> int:
    duration = duration_seconds(args.duration)
    if duration is None or not 0 < duration <= MAX_SILENCE_S:
        raise SystemExit(f"greymesh alerts silence: --for {args.duration!r}: a duration like 30m or 2h, "
                         f"at most {MAX_SILENCE_S // 3600}h")
    s = _api(args, "/silences", {"service": args.service, "kind": args.kind, "duration_s": float(duration),
                                 "comment": args.comment})["silence"]
    print(f"silence {s['id']} until {_when(s['ends_at'])}")
    return 0


def _unsilence(args: argparse.Namespace) -> int:
    _api(args, "/silences/expire", {"id": args.id})
    print(f"silence {args.id} expired")
    return 0


def _test(args: argparse.Namespace) -> int:
    doc = _api(args, "/alerts/test", {"receiver": args.receiver})
    print(f"{args.receiver}: {doc['outcome']}" + (f" ({doc['error']})" if doc["error"] else ""))
    return 0 if doc["outcome"] == "sent" else 1
