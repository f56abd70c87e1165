"""Verbs of the lab: up, status, watch, drain, undrain, kill, restart, scale, kill-primary, down."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from deploy.lab import drills
from deploy.lab.cluster import (
    BACKENDS,
    DEFAULT_RUN_DIR,
    FRONTS,
    Lab,
    LabError,
    LabOptions,
    up_steps,
)
from deploy.lab.postgres import PostgresError, PostgresNotInstalled


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; e.g. --cpu 0.5") from None
    if not 0.01 <= value <= 64:
        raise argparse.ArgumentTypeError("give a fraction of a core between 0.01 and 64")
    return value


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--run-dir",
        type=Path,
        default=DEFAULT_RUN_DIR,
        help=f"lab state (default {DEFAULT_RUN_DIR})",
    )
    top = argparse.ArgumentParser(
        prog="python -m deploy.lab", description="A real cattle cluster on this machine."
    )
    verbs = top.add_subparsers(dest="verb", required=True, metavar="VERB")

    up = verbs.add_parser("up", parents=[common], help="start database, nodes and proxy")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--backend", choices=BACKENDS, default="sqlite")
    up.add_argument("--replicas", type=int, default=0, help="streaming replicas (postgres)")
    up.add_argument(
        "--front",
        choices=FRONTS,
        default="haproxy",
        help="haproxy on loopback; anycast: BIRD router + ExaBGP sidecars in namespaces; "
        "anycast+haproxy: the same with an HAProxy per namespace over every node",
    )
    up.add_argument(
        "--pinning",
        choices=("on", "off"),
        default="on",
        help="anycast: the router keeps each flow on its node when next hops change",
    )
    up.add_argument(
        "--bfd",
        choices=("on", "off"),
        default="on",
        help="anycast: BFD between the router and each node (a silent node's route goes "
        "in under a second; off: when the BGP hold time runs out)",
    )
    up.add_argument("--cpu", type=_fraction, help="cap each node at this fraction of a core")
    up.add_argument("--drain-delay", type=float, default=2.0, help="seconds (default 2)")
    up.add_argument(
        "--no-retries", action="store_true", help="HAProxy without retries (to show what they buy)"
    )
    up.add_argument(
        "--no-observe",
        action="store_true",
        help="HAProxy takes a dead node out on its health checks only, not on live traffic",
    )
    up.add_argument(
        "--prometheus",
        action="store_true",
        help="also run Prometheus scraping every node and HAProxy (its UI is the live graph)",
    )
    up.add_argument(
        "--max-nodes",
        type=int,
        help="the most nodes `scale` may grow to (default: --nodes)",
    )

    verbs.add_parser("status", parents=[common], help="show the lab").add_argument(
        "--json", action="store_true", help="lab.json plus live health, as JSON"
    )
    watch = verbs.add_parser("watch", parents=[common], help="live view of the fleet")
    watch.add_argument("--interval", type=float, default=1.0)
    watch.add_argument(
        "--count", type=int, default=0, help="refreshes before exiting (0: until Ctrl+C)"
    )
    for verb, text in (
        ("drain", "take NODE out gracefully (SIGTERM: drain, then exit 0)"),
        ("undrain", "remove NODE's drain file"),
        ("kill", "SIGKILL NODE"),
        ("restart", "stop NODE if running, start it again"),
    ):
        sub = verbs.add_parser(verb, parents=[common], help=text)
        sub.add_argument("node", metavar="NODE", help="a node id from lab.json, e.g. n1")
        if verb == "drain":
            sub.add_argument(
                "--keep", action="store_true", help="only create the drain file; the node stays up"
            )
        if verb == "kill":
            sub.add_argument(
                "--machine",
                action="store_true",
                help="anycast: kill everything in NODE's namespace (its ExaBGP too)",
            )
    verbs.add_parser(
        "scale", parents=[common], help="grow or shrink the fleet to COUNT nodes, live"
    ).add_argument("count", type=int, metavar="COUNT")
    verbs.add_parser(
        "kill-primary",
        parents=[common],
        help="patroni: SIGKILL the primary's PostgreSQL and wait for the new leader",
    )
    verbs.add_parser(
        "pinning", parents=[common], help="anycast: switch the router's connection pinning"
    ).add_argument("state", choices=("on", "off"))
    verbs.add_parser("down", parents=[common], help="stop everything the lab started")
    return top


def bring_up(lab: Lab, options: LabOptions, console: Console | None = None) -> dict[str, Any]:
    """`lab.up`, its steps shown as they go (`up` and `make demo` both start a lab this way).

    On a terminal: a bar of the steps done, the time spent and an estimate of
    the time left (from the steps so far). Otherwise (a log, a pipe): one
    plain line as each step begins, then one when the lab is up.
    """
    console = console or Console()
    total = up_steps(options)
    started = time.monotonic()
    if not console.is_terminal:
        begun: list[str] = []

        def line(what: str) -> None:
            begun.append(what)
            console.print(
                f"up: step {len(begun)} of {total}, {what} "
                f"({time.monotonic() - started:.1f} s in)",
                markup=False, highlight=False, soft_wrap=True,
            )  # fmt: skip

        state = lab.up(options, progress=line)
        console.print(f"up: lab up after {time.monotonic() - started:.1f} s", highlight=False)
        return state
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[dim]in"),
        TimeElapsedColumn(),
        TextColumn("[dim]left about"),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("bringing the lab up", total=total)
        steps = 0

        def step(what: str) -> None:
            nonlocal steps
            bar.update(task, completed=steps, description=what)  # the ones before it are done
            steps += 1

        state = lab.up(options, progress=step)
        bar.update(task, completed=total, description="lab up")
    return state


def _print_status(state: dict[str, Any]) -> None:
    print(f"lab {state['run_dir']}  backend={state['options']['backend']}  front={state['front']}")
    if state.get("haproxy"):
        print(f"haproxy stats: {state['haproxy']['stats_url']}")
    if state.get("prometheus"):
        print(f"prometheus: {state['prometheus']['url']}")
    database = state.get("database") or {}
    print(f"database: {database.get('primary')}")
    for replica in database.get("replicas", []):
        print(f"  replica: {replica}")
    router = state.get("router")
    if router is not None:
        hops = ", ".join(router.get("next_hops", [])) or "none"
        print(
            f"anycast {state['front']}  client namespace {state['anycast']['client_netns']}  "
            f"pinning {'on' if router.get('pinning') else 'off'}  "
            f"bfd {'on' if router.get('bfd') else 'off'}  "
            f"bird {'running' if router['bird_running'] else 'NOT running'}"
        )
        print(f"router ECMP next hops: {hops}")
        proxies = any("proxy_running" in node for node in state["nodes"])
        print(
            f"{'node':6} {'pid':>8} {'url':26} {'state':10} {'bgp':12} {'bfd':9} "
            f"{'announced':10} {'sidecar':8}" + (" haproxy" if proxies else "")
        )
        for node in state["nodes"]:
            health = node.get("health") or {}
            lifecycle = health.get("lifecycle") or ("down" if not node["running"] else "?")
            print(
                f"{node['id']:6} {node['pid'] or '-':>8} {node['url']:26} {lifecycle!s:10} "
                f"{node.get('bgp') or '-':12} {node.get('bfd') or '-':9} "
                f"{'yes' if node.get('announced') else 'no':10} "
                f"{'running' if node.get('sidecar_running') else 'down':8}"
                + ((" running" if node["proxy_running"] else " down") if proxies else "")
            )
        return
    print(f"{'node':6} {'pid':>8} {'url':26} {'state':10} {'haproxy':12} cgroup")
    for node in state["nodes"]:
        health = node.get("health") or {}
        lifecycle = (
            health.get("lifecycle")
            or health.get("state")
            or ("down" if not node["running"] else "?")
        )
        proxy = (node.get("haproxy") or {}).get("status", "-")
        print(
            f"{node['id']:6} {node['pid'] or '-':>8} {node['url']:26} {lifecycle!s:10} "
            f"{proxy!s:12} {node.get('cgroup') or '-'}"
        )


def _drain(lab: Lab, node: str) -> str:
    lab.drain(node)
    return "drained and stopped"


def _kill(lab: Lab, node: str, machine: bool) -> str:
    lab.kill(node, machine=machine)
    return f"killed (SIGKILL){' with its namespace' if machine else ''}"


def _scale(lab: Lab, count: int) -> str:
    changed = lab.scale(count)
    return (
        f"{count} nodes: added {', '.join(changed['added']) or 'none'}, "
        f"removed {', '.join(changed['removed']) or 'none'}"
    )


def _kill_primary(lab: Lab) -> str:
    failover = lab.kill_primary()
    return (
        f"killed postgres of {failover['old']} (pid {failover['pid']}); "
        f"{failover['new']} leads after {failover['seconds']:.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    lab = Lab(args.run_dir)
    try:
        if args.verb == "up":
            bring_up(
                lab,
                LabOptions(
                    nodes=args.nodes,
                    backend=args.backend,
                    replicas=args.replicas,
                    front=args.front,
                    cpu=args.cpu,
                    drain_delay_s=args.drain_delay,
                    retries=not args.no_retries,
                    observe=not args.no_observe,
                    pinning=args.pinning == "on",
                    bfd=args.bfd == "on",
                    prometheus=args.prometheus,
                    max_nodes=args.max_nodes,
                ),
            )
            _print_status(lab.status())
        elif args.verb == "status":
            state = lab.status()
            if args.json:
                print(json.dumps(state, indent=2))
            else:
                _print_status(state)
        elif args.verb == "watch":
            from deploy.lab.watch import watch

            watch(lab, interval_s=args.interval, count=args.count)
        elif args.verb == "drain" and args.keep:
            lab.drain(args.node, keep=True)
            print(f"{args.node}: drain file created")
        elif args.verb == "drain":
            drills.run(lab, "drain", args.node, lambda: _drain(lab, args.node))
        elif args.verb == "undrain":
            lab.undrain(args.node)
            print(f"{args.node}: drain file removed")
        elif args.verb == "kill":
            drills.run(lab, "kill", args.node, lambda: _kill(lab, args.node, args.machine))
        elif args.verb == "restart":
            drills.run(
                lab,
                "restart",
                args.node,
                lambda: f"running again, pid {lab.restart(args.node)['pid']}",
            )
        elif args.verb == "scale":
            drills.run(lab, "scale", str(args.count), lambda: _scale(lab, args.count))
        elif args.verb == "kill-primary":
            drills.run(lab, "kill-primary", None, lambda: _kill_primary(lab))
        elif args.verb == "pinning":
            lab.set_pinning(args.state == "on")
            print(f"pinning {args.state}")
        elif args.verb == "down":
            stopped = lab.down()
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    except (LabError, PostgresNotInstalled, PostgresError) as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
