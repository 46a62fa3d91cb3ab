"""`greymesh policy test|push|diff|eval`: the Rego in policies/ and the OPA that runs it
(the lifecycle itself is controlplane/policy.py)."""

from __future__ import annotations

import argparse
import getpass
import json
from collections.abc import Callable
from pathlib import Path

from controlplane.policy import POLICY_DIR, OpaApi, PolicyError, diff, evaluate, push, run_tests
from core.datadir import DataDir
from core.endpoints import OPA_HTTP, Endpoints
from greymesh.runtime import opa


def _opa(data_dir: Path) -> tuple[OpaApi, Path]:
    """The data dir's OPA, with the control plane's token (the CLI is its operator), and
    the policy bundle that OPA runs."""
    dd = DataDir(data_dir)
    url = Endpoints.require(dd, OPA_HTTP, "OPA").url(OPA_HTTP)
    files = opa.files(dd)
    return OpaApi.with_token_file(url, files.admin_token), files.policy_bundle


def register(subparsers: argparse._SubParsersAction,
             data_dir_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add `greymesh policy test|push|diff|eval`; data_dir_arg adds the CLI's --data-dir option."""
    desc = "test, push, compare and query the authorization policy (Rego) that OPA runs"
    actions = subparsers.add_parser("policy", help=desc, description=desc).add_subparsers(
        required=True, metavar="ACTION")

    def action(name: str, fn: Callable[[argparse.Namespace], int], summary: str, *,
               opa: bool) -> argparse.ArgumentParser:
        sp = actions.add_parser(name, help=summary, description=summary)
        sp.set_defaults(func=fn)
        sp.add_argument("--dir", type=Path, default=POLICY_DIR, help="the policy folder (default: %(default)s)")
        if opa:
            data_dir_arg(sp)
        return sp

    action("test", _test, "run the policy's unit tests (opa test)", opa=False)
    action("push", _push, "check and test the policy, then make it the one the mesh's OPA runs", opa=True)
    action("diff", _diff, "show how the local policy differs from the one OPA runs", opa=True)
    sp = action("eval", _eval, "ask OPA for the decision on one input document", opa=True)
    sp.add_argument("--input", type=Path, required=True, help="JSON file: the input document (as the bridge sends)")


def _test(args: argparse.Namespace) -> int:
    ok, report = run_tests(args.dir)
    print(report, end="")
    return 0 if ok else 1


def _push(args: argparse.Namespace) -> int:
    dd = DataDir(args.data_dir)
    api, bundle = _opa(args.data_dir)
    result = push(api, bundle, args.dir, actor=getpass.getuser(), journal_path=dd.policy_journal)
    print(f"pushed {args.dir} ({len(result.modules)} module(s), sha256 {result.policy_hash[:12]}) "
          f"as {result.pushed_by}; journal {dd.policy_journal}")
    return 0


def _diff(args: argparse.Namespace) -> int:
    api, bundle = _opa(args.data_dir)
    print(diff(api, bundle, args.dir) or f"OPA at {api.url} runs exactly {args.dir}\n", end="")
    return 0


def _eval(args: argparse.Namespace) -> int:
    try:
        doc = json.loads(args.input.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PolicyError(f"{args.input}: cannot read a JSON input document: {exc}") from exc
    print(json.dumps(evaluate(_opa(args.data_dir)[0], doc), indent=2))
    return 0
