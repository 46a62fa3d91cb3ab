"""The `greymesh` command: the top floor, which composes the stages and is imported by nothing.

User commands: up, down, status, apply, scale, policy (test, push, diff, eval), ca rotate,
taps (tail, query, stats), ml (train, score, anomalies, models, rollback, eval, record),
doctor.  Every process a mesh runs is a row of the runtime's workload table, started as
``python -m <module>`` by the supervisor (greymesh/runtime/).
Exit codes: 0 done, 1 failed at run time (or: `status` of a mesh that is not all up),
2 refused input (the message says why).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from controlplane.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, TYPE_ORDER
from audit.store import PASSWORD_ENV as STORE_PASSWORD_ENV
from core import credentials
from core.datadir import PRIVATE_UMASK, DataDir, default_data_dir
from core.errors import GreymeshError
from core.specread import SpecError
from greymesh import actions_cli, doctor, ml_cli, policy_cli, taps_cli
from greymesh.runtime import local as runtime


def main(argv: list[str] | None = None) -> int:
    os.umask(PRIVATE_UMASK)
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    except GreymeshError as exc:
        print(f"{exc.prefix}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="greymesh", description="An AI-driven observability service mesh.")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    def cmd(name: str, fn, help: str) -> argparse.ArgumentParser:  # noqa: A002
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=fn)
        return sp

    def data_dir(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data-dir", type=Path, default=default_data_dir(),
                        help="where the mesh keeps all its state (default: %(default)s)")

    sp = cmd("up", _up, "start the local mesh (or what of it is not running) and return once it serves")
    sp.add_argument("spec", nargs="?", type=Path,
                    help="mesh.yaml; it becomes the watched file (default: the watched file, or on a new data dir "
                         "a copy of the demo mesh in the data dir)")
    data_dir(sp)
    sp.add_argument("--xds-api", choices=("delta", "sotw"), default="delta",
                    help="xDS variant the sidecars use (default: %(default)s)")
    sp.add_argument("--rps", type=float, default=5.0, help="steady demo load, requests/s (0: none)")
    sp.add_argument("--no-watch", action="store_true", help="do not re-apply the spec file when it changes")
    sp.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops the mesh")
    sp.add_argument("--kafka", metavar="HOST:PORT[,...]",
                    help="an existing Kafka cluster for the audit taps, or 'local' to run a broker here "
                         "(default: what this data dir used last; a local broker at first)")
    sp.add_argument("--store-password-file", metavar="FILE", type=Path,
                    help="a file only you can read (0600) holding the ClickHouse server's password "
                         f"(or set {STORE_PASSWORD_ENV}); never put it in --store")
    sp.add_argument("--store", metavar="URL",
                    help="tap store: clickhouse://host:9000/db, or 'chdb' for the embedded store in the data dir "
                         "(default: what this data dir used last; chdb at first)")

    sp = cmd("down", _down, "stop everything `up` started in the data dir")
    data_dir(sp)

    sp = cmd("status", _status, "show every workload (state, restarts, last exit), instance and sidecar; "
                                "exit 1 unless all of it runs")
    data_dir(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = cmd("apply", _apply, "validate a mesh.yaml, push it to the running control plane and watch that file")
    sp.add_argument("spec", type=Path)
    data_dir(sp)

    sp = cmd("scale", _scale, "run N instances of SERVICE[/SUBSET] (app + sidecar); removal drains first")
    sp.add_argument("target", metavar="SERVICE[/SUBSET]")
    sp.add_argument("count", type=int, metavar="N")
    data_dir(sp)

    sp = cmd("ca", _ca_rotate, "rotate the mesh's root CA without dropping a connection (docs/identity.md)")
    sp.add_argument("action", choices=("rotate",))
    data_dir(sp)

    policy_cli.register(sub, data_dir)
    taps_cli.register(sub, data_dir)
    ml_cli.register(sub, data_dir)
    actions_cli.register(sub, data_dir)

    sp = cmd("doctor", _doctor, "list the external components greymesh uses and how to install missing ones")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--component", help=argparse.SUPPRESS)
    sp.add_argument("--version-only", action="store_true", help=argparse.SUPPRESS)
    return p


# --- commands --------------------------------------------------------------------------


def _store_password(args: argparse.Namespace) -> str | None:
    """The server store's password from --store-password-file or the environment; None: unsaid."""
    if args.store_password_file:
        return credentials.read(args.store_password_file)
    return os.environ.get(STORE_PASSWORD_ENV)


def _up(args: argparse.Namespace) -> int:
    dd = DataDir(args.data_dir)
    spec = args.spec or runtime.default_spec(dd)
    endpoints = runtime.up(dd, spec, xds_api=args.xds_api, load_rps=args.rps, watch=not args.no_watch,
                           kafka=args.kafka, store=args.store, store_password=_store_password(args),
                           progress=_progress)
    print(f"mesh is up: entrypoint {endpoints.entrypoint}  (spec {spec.resolve()}, data dir {dd.root}; "
          f"`greymesh status --data-dir {dd.root}`, `greymesh down --data-dir {dd.root}`)")
    if not args.foreground:
        return 0
    try:
        while True:
            time.sleep(5)
            print(_one_line_summary(runtime.status(dd)), flush=True)
    except KeyboardInterrupt:
        print("\nstopping the mesh")
        runtime.down(dd, progress=_progress)
    return 0


def _down(args: argparse.Namespace) -> int:
    n = runtime.down(DataDir(args.data_dir), progress=_progress)
    print(f"stopped {n} workload(s)" if n else "nothing was running")
    return 0


def _status(args: argparse.Namespace) -> int:
    doc = runtime.status(DataDir(args.data_dir))
    if args.json:
        print(json.dumps(doc, indent=2))
    elif doc["mesh"] is None:
        print(f"no mesh has been started in {args.data_dir} (`greymesh up --data-dir {args.data_dir}` starts one)")
    else:
        print(_render_status(doc))
    return 0 if runtime.healthy(doc) else 1


def _apply(args: argparse.Namespace) -> int:
    result = runtime.apply_spec(DataDir(args.data_dir), args.spec)
    changed = result.get("changed", [])
    print(f"applied {args.spec} (now the watched file): {len(changed)} sidecar(s) get new config"
          + (f": {', '.join(changed)}" if changed else ""))
    return 0


def _scale(args: argparse.Namespace) -> int:
    names = runtime.scale(DataDir(args.data_dir), args.target, args.count, progress=_progress)
    print(f"{args.target}: {len(names)} instance(s): {', '.join(names)}")
    return 0


def _ca_rotate(args: argparse.Namespace) -> int:
    print("rotating the root: new root into every bundle, then new SVIDs, then the old root out "
          "(each step waits for every sidecar's ACK)", flush=True)
    result = runtime.rotate_root(DataDir(args.data_dir))
    print(f"rotated {result['trust_domain']}: new root {result['new_root_serial']}, "
          f"{len(result['retired_roots'])} old root(s) retired, {result['sidecars']} SVIDs re-issued")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    rows, ok = doctor.report()
    if args.component:
        row = next((r for r in rows if r["name"] == args.component), None)
        if row is None or not row["installed"]:
            return 1
        print(row["version"] if args.version_only else json.dumps(row))
        return 0
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0 if ok else 1
    for r in rows:
        state = f"{r['version']}  {r['path']}" if r["installed"] else f"MISSING ({r['problem']}); install: {r['install']}"
        print(f"{r['name']:<12} {r['purpose']:<40} pinned {r['pinned']:<28} {state}")
    print("all components installed" if ok else "some components are missing: run the install command shown")
    return 0 if ok else 1


# --- rendering -------------------------------------------------------------------------


def _progress(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def _one_line_summary(doc: dict) -> str:
    nodes = doc.get("controlplane", {}).get("nodes", {})
    in_sync = sum(1 for n in nodes.values() if n.get("in_sync"))
    outcomes = doc.get("loadgen", {}).get("outcomes", {})
    line = f"{time.strftime('%H:%M:%S')} sidecars in sync {in_sync}/{len(nodes)}; load outcomes {outcomes}"
    sink, collector = doc.get("taps", {}).get("sink", {}), doc.get("taps", {}).get("collector", {})
    if "rows" in sink and "producer" in collector:
        line += (f"; taps stored {sum(sink['rows'].values())}, lag {sum(sink['lag'].values())}, "
                 f"dropped {collector['producer']['dropped_events']}")
    ml = doc.get("ml", {})
    if ml.get("model_version"):
        line += f"; ml {ml['model_version']}: {ml['windows_scored']} windows scored, open {ml['open_now'] or 'none'}"
    return line


def _render_status(doc: dict) -> str:
    lines = [f"data dir:   {doc['data_dir']}", f"entrypoint: {doc.get('entrypoint') or '-'}",
             f"watching:   {doc.get('spec_source') or '-'}"]
    cp = doc.get("controlplane", {})
    spec = cp.get("spec")
    if spec:
        applied = time.strftime("%H:%M:%S", time.localtime(spec["at"]))
        lines.append(f"spec:       {spec['source']} (mesh {spec['mesh']}, sha {spec['sha256'][:12]}, applied {applied})")
    if cp.get("last_rejected"):
        rej = cp["last_rejected"]
        lines.append(f"last refused spec: {rej['source']} at {time.strftime('%H:%M:%S', time.localtime(rej['at']))}")
        lines += [f"    {e}" for e in rej["errors"]]
    lines += [f"override:   {_override(o)}" for o in cp.get("overrides", [])]
    if "error" in cp:
        lines.append(f"control plane: {cp['error']}")
    lines.append("")
    sv = doc["supervisor"]
    lines.append(f"supervisor: pid {sv['pid']}" if sv["running"] else
                 f"supervisor: NOT RUNNING, nothing restarts a workload that exits (`greymesh up` starts it; "
                 f"log {sv['log']})")
    lines.append(f"{'WORKLOAD':<28} {'PID':>7}  {'STATE':<12} {'RESTARTS':>8}  LAST EXIT")
    for name, p in doc["processes"].items():
        lines.append(f"{name:<28} {p['pid'] or '-':>7}  {p['state']:<12} {p['restarts']:>8}  {_last_exit(p)}"
                     + (f"   ({p['error']}; log {p['log']})" if p["error"] and not p["ready"] else ""))
    if doc.get("instances"):
        lines.append("")
        lines.append("INSTANCES")
        for target, insts in doc["instances"].items():
            names = ", ".join(i["name"] + ("" if i["serving"] else " (not serving)") for i in insts)
            lines.append(f"  {target:<24} {len(insts)}: {names}")
    nodes = cp.get("nodes", {})
    if nodes:
        lines.append("")
        acked = f"ACKED ({' '.join(_SHORT_TYPE[t] for t in TYPE_ORDER)})"
        lines.append(f"{'SIDECAR':<16} {'XDS':<6} {'CONN':<5} {'IN SYNC':<8} {acked:<45} LAST NACK")
        for node, n in sorted(nodes.items()):
            lines.append(
                f"{node:<16} {n.get('protocol') or '-':<6} {('yes' if n.get('connected') else 'no'):<5} "
                f"{('yes' if n.get('in_sync') else 'NO'):<8} {_acked(n):<45} {_last_nack(n)}"
                + ("   [authz FAIL-OPEN]" if n.get("fail_open") else "")
            )
    if "loadgen" in doc:
        lines.append("")
        lines.append(f"load: {doc['loadgen']['rps']} rps to {doc['loadgen']['url']}: outcomes {doc['loadgen']['outcomes']}")
    if "taps" in doc:
        lines += ["", *_render_taps(doc["taps"])]
    if "ml" in doc:
        lines += ["", _render_ml(doc["ml"])]
    if "actions" in doc:
        lines += ["", *_render_actions(doc["actions"])]
    return "\n".join(lines)


def _render_actions(a: dict) -> list[str]:
    """The loop's health and mode, what it holds, the firing alerts and every receiver's state."""
    if "error" in a:
        return [f"actions: {a['error']}"]
    loop, health = a["loop"], a["health"]
    modes = ", ".join(f"{s} {m}" for s, m in loop["modes"].items())
    lines = [f"actions: mode {loop['default_mode']}" + (f" ({modes})" if modes else "")
             + (f"; FROZEN by {loop['frozen']}" if loop["frozen"] else "")
             + (f"; BLIND: {health['detail']}" if loop["blind"] else "; the loop sees")]
    if a.get("spec_problem"):
        lines.append(f"    config: {a['spec_problem']}")
    for e in loop["routing"]:
        lines.append(f"    routing {e['service']}: {' / '.join(f'{s} {w}' for s, w in e['weights'].items())} "
                     f"(away from {e['drained']})")
    for e in loop["scaling"]:
        lines.append(f"    scaling {e['service']}: {e['instances']} instance(s) (was {e['baseline']})")
    if a.get("unsent_decisions"):
        lines.append(f"    {a['unsent_decisions']} decision(s) wait for Kafka"
                     + (f", {a['dropped_decisions']} dropped" if a.get("dropped_decisions") else ""))
    firing = a["alerts"]["firing"]
    lines.append(f"alerts: {len(firing)} firing" + "".join(f"\n    {f['key']} {f['severity']}"
                                                           + (f" ({f['muted']})" if f["muted"] else "")
                                                           for f in firing))
    for r in a["receivers"]:
        if r["state"] != "ok":
            lines.append(f"    receiver {r['name']} ({r['type']}) {r['state'].upper()}: {r['error']}")
    return lines


def _override(o: dict) -> str:
    """One override in force, as `status` shows it: what it changes, who set it, when."""
    what = [" / ".join(f"{s} {w}" for s, w in o["weights"].items())] if o.get("weights") else []
    for key, text in (("timeout_s", "timeout {:g} s"), ("retry_attempts", "{} retries"),
                      ("outlier_consecutive_5xx", "eject after {} 5xx"), ("outlier_max_ejection_percent",
                                                                          "eject up to {}%")):
        if o.get(key) is not None:
            what.append(text.format(o[key]))
    return (f"{o['service']}: {', '.join(what)}, by {o['by']} {time.time() - o['created_at']:.0f} s ago "
            f"(id {o['id']}: {o['reason']})")


def _last_exit(p: dict) -> str:
    e = p.get("last_exit")
    if not e:
        return "-"
    how = f"code {e['code']}" if e["code"] is not None else (f"signal {e['signal']}" if e["signal"] else "gone")
    return f"{how} at {time.strftime('%H:%M:%S', time.localtime(e['at']))} after {e['ran_s']:.1f} s"


def _render_ml(ml: dict) -> str:
    if not ml.get("model_version"):
        when = (f"the scorer trains the first one at {time.strftime('%H:%M', time.localtime(ml['auto_train_at']))}"
                if ml.get("auto_train_at") else "it is trained after 20 minutes of traffic")
        return f"anomaly detection: no model yet; {when} (or run `greymesh ml train` now)" + (
            f"\n    refused model: {ml['model_error']}" if ml.get("model_error") else "")
    text = (f"anomaly detection: model {ml['model_version']}, {ml['windows_scored']} windows scored, "
            f"{ml['anomalies_opened']} anomalies raised, open now: {', '.join(ml['open_now']) or 'none'}")
    for key in ("model_error", "source_error"):
        if ml.get(key):
            text += f"\n    {key.replace('_', ' ')}: {ml[key]}"
    return text


def _render_taps(taps: dict) -> list[str]:
    collector, sink = taps.get("collector", {}), taps.get("sink", {})
    lines = [f"taps: Kafka {taps['kafka']} -> store {taps['store']}"]
    if "error" in collector or "error" in sink:
        return lines + [f"    collector: {collector.get('error', 'ok')}; sink: {sink.get('error', 'ok')}"]
    producer = collector["producer"]
    lines.append(f"    collected {collector['collector']['events']}, stored {sink['rows']}, "
                 f"consumer lag {sink['lag']}, spool {producer['spool_records']} records / {producer['spool_bytes']} B, "
                 f"broker {'up' if producer['broker_up'] else 'DOWN'}")
    if producer["dropped_events"]:
        lines.append(f"    ALERT: {producer['dropped_events']} events dropped (spool full while Kafka was away)")
    return lines


_SHORT_TYPE = {CLUSTER: "CDS", ENDPOINT: "EDS", SECRET: "SDS", LISTENER: "LDS", ROUTE: "RDS"}


def _acked(node: dict) -> str:
    """The version each type was last ACKed at, shortened (- for never)."""
    types = node.get("types", {})
    return " ".join(f"{(types.get(t, {}).get('acked_version') or '-')[:8]:<8}" for t in TYPE_ORDER)


def _last_nack(node: dict) -> str:
    nacks = [(t.rsplit(".", 1)[-1], v["nack"]) for t, v in node.get("types", {}).items() if v.get("nack")]
    if not nacks:
        return "-"
    kind, nack = max(nacks, key=lambda kv: kv[1]["at"])
    return f"{kind} {nack['version']}: {nack['message']}"


if __name__ == "__main__":
    sys.exit(main())
