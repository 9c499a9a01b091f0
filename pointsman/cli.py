"""The ``pointsman`` command.

    pointsman up --config FILE             every component the file configures (+ admin API)
    pointsman router --config FILE         the router's listeners (+ admin API)
    pointsman sidecar --app NAME --config FILE
                                           local listeners for an app pointsman does not run
                                           (the file's sidecars:), printed as VAR=address
    pointsman check-config FILE [FILE...]  validate; every error with file, path and reason
    pointsman schema                       the config's JSON Schema
    pointsman plan FILE [--job NAME] [--eval-id ID]
                                           where the file's jobs would be placed, and why not
    pointsman reload [--admin HOST:PORT | --config FILE]
                                           ask a running instance to reload its config
    pointsman top [--admin HOST:PORT | --config FILE] [--interval S] [--once] [--no-color]
                                           live view of SQL listeners and HTTP routes
    pointsman status [--admin HOST:PORT | --config FILE] [--json]
                                           jobs, allocations, services, listeners, clusters, last reload
    pointsman logs ALLOC [--stderr] [--tail BYTES] [-f] [--admin HOST:PORT | --config FILE]
                                           what an allocation's task wrote

Exit codes: 0 success, 1 an invalid config, a refused reload or an unreachable instance,
2 a usage error (argparse) or, for ``plan``, an instance that could not be placed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import yaml

from pointsman import __version__
from pointsman.config import Config, json_schema, load_file
from pointsman.errors import AdminError, ConfigError
from pointsman.supervisor import DEFAULT_DRAIN_TIMEOUT, Supervisor, build_supervisor
from router.config import format_address, parse_address
from scheduler.config import effective_nodes
from scheduler.errors import SpecError
from scheduler.model import Plan
from scheduler.plan import place_into, placement_order
from scheduler.state import ClusterState

log = logging.getLogger("pointsman")

DEFAULT_ADMIN = ("127.0.0.1", 9901)


def _run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run on uvloop where it is installed (the loop the tests and production use)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


# -- serving ---------------------------------------------------------------------------


def _serve_supervisor(
    args: argparse.Namespace,
    build: Callable[[Config], Supervisor],
    ready: Callable[[Supervisor], str] | None = None,
    check: Callable[[Config], str | None] | None = None,
) -> int:
    """Load the file, build the supervisor, start it, print what `ready` says, serve until
    stopped. `check` refuses a valid file that does not suit the command (its message)."""
    try:
        config = load_file(args.config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    problem = check(config) if check is not None else None
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1

    async def main() -> int:
        supervisor = build(config)
        try:
            await supervisor.start()
        except ConfigError as exc:
            print(exc.render(), file=sys.stderr)
            return 1
        if ready is not None:
            print(ready(supervisor), flush=True)
        return await supervisor.run_until_stopped()

    try:
        return _run(main)
    except KeyboardInterrupt:
        # Ctrl-C before the supervisor installed its handlers (while starting up).
        return 130
    except Exception:
        # A bug, not a config problem: the traceback is what a bug report needs.
        log.exception("pointsman stopped on an unexpected error")
        return 1


def _serve(args: argparse.Namespace, *, router: bool, discovery: bool | None = None) -> int:
    def build(config: Config) -> Supervisor:
        return build_supervisor(
            config,
            args.config,
            router=router,
            discovery=discovery,
            drain_timeout=args.drain_timeout,
            watch_interval=None if args.no_watch else args.watch_interval,
        )

    ready = None
    if router and discovery is None:  # `up`: tell a person what runs where
        from pointsman.banner import banner

        ready = banner
    return _serve_supervisor(args, build, ready)


def cmd_up(args: argparse.Namespace) -> int:
    # Discovery runs when the config has a discovery section or jobs; the scheduler with jobs.
    return _serve(args, router=True)


def cmd_router(args: argparse.Namespace) -> int:
    return _serve(args, router=True, discovery=False)


def cmd_dns(args: argparse.Namespace) -> int:
    return _serve(args, router=False, discovery=True)


def cmd_sidecar(args: argparse.Namespace) -> int:
    from pointsman.sidecar_component import SidecarComponent, build_sidecar_supervisor, find_sidecar

    def check(config: Config) -> str | None:
        if find_sidecar(config, args.app) is not None:
            return None
        known = ", ".join(car.app for car in config.sidecars) or "none"
        return f"{args.config}: sidecars: no entry has app {args.app!r} ({known})"

    def build(config: Config) -> Supervisor:
        supervisor, _ = build_sidecar_supervisor(
            config,
            args.config,
            args.app,
            drain_timeout=args.drain_timeout,
            watch_interval=None if args.no_watch else args.watch_interval,
        )
        return supervisor

    def ready(supervisor: Supervisor) -> str:
        # What the app is started with (`export` them); the logs go to stderr.
        sidecar = supervisor.component("sidecar")
        assert isinstance(sidecar, SidecarComponent)
        return "\n".join(sidecar.env())

    return _serve_supervisor(args, build, ready, check)


# -- offline commands --------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        try:
            config = load_file(path)
        except ConfigError as exc:
            print(exc.render(), file=sys.stderr)
            failed = True
            continue
        print(
            f"{path}: ok ({len(config.listeners)} listeners, {len(config.clusters)} clusters, hash {config.digest()})"
        )
    return 1 if failed else 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def _format_memory(size: int) -> str:
    """128Mi, 2Gi; sizes that are not whole units of Mi/Gi rounded: 23.5Gi."""
    for unit, factor in (("Gi", 1024**3), ("Mi", 1024**2)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    for unit, factor in (("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if size >= factor:
            return f"{size / factor:.1f}{unit}"
    return str(size)


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        config = load_file(args.file)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    algorithm = config.scheduler.algorithm if config.scheduler is not None else "binpack"
    try:
        nodes = [node.to_node() for node in effective_nodes(config.nodes)]
        jobs = [job.to_job() for job in config.jobs]
        state = ClusterState(nodes)
    except SpecError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    names = [job.name for job in jobs]
    if args.job is not None and args.job not in names:
        print(f"{args.file}: unknown job {args.job!r} (known: {', '.join(names) or 'none'})", file=sys.stderr)
        return 1
    order = placement_order(jobs, args.job)
    plans: dict[str, Plan] = {
        job.name: place_into(state, job, algorithm=algorithm, eval_id=args.eval_id) for job in order
    }
    shown = [job for job in jobs if args.job is None or job.name == args.job]
    eval_note = f", eval id {args.eval_id!r}" if args.eval_id else ""
    print(f"Plan for {args.file} ({len(nodes)} node{'' if len(nodes) == 1 else 's'}, algorithm {algorithm}{eval_note})")
    if args.job is not None and len(order) > 1:
        first = ", ".join(job.name for job in order if job.name != args.job)
        print(f"(placed first for affinity: {first})")
    placed = total = 0
    for job in shown:
        plan = plans[job.name]
        print()
        print(f'Job: "{job.name}" (version {job.version}, driver {job.driver}, count {job.count})')
        for alloc in sorted(plan.placements, key=lambda a: a.index):
            ports = " ".join(f"{name}={port}" for name, port in alloc.ports.items())
            print(f"  + {job.name}[{alloc.index}] -> {alloc.node}" + (f"  ports {ports}" if ports else ""))
        for failure in plan.failures:
            print(f"  ! {job.name}[{failure.index}] not placed")
        if plan.failures:
            rejected = sum(plan.failures[0].reasons.values())
            print(f"  Placement failures ({rejected} of {len(nodes)} nodes rejected):")
            for line in plan.explain().splitlines()[1:]:
                print(f"    {line}")
        if job.count == 0:
            print("  (count 0: nothing to place)")
        placed += len(plan.placements)
        total += len(plan.placements) + len(plan.failures)
    print()
    print("Nodes:")
    for i, node in enumerate(nodes):
        jobs_here = ", ".join(f"{name}x{n}" for name, n in sorted(state.node_jobs[i].items())) or "-"
        print(
            f"  {node.name}: cpu {state.cpu_used[i]:g}/{node.capacity.cpu:g}, "
            f"memory {_format_memory(state.mem_used[i])}/{_format_memory(node.capacity.memory)}; {jobs_here}"
        )
    print()
    if placed < total:
        print(f"Placed {placed} of {total} instances: {total - placed} could not be placed (see above).")
        return 2
    print(f"Placed {placed} of {total} instances.")
    return 0


# -- talking to a running instance -------------------------------------------------------


def _admin_from_file(path: str) -> tuple[str, int]:
    """``admin.listen`` of a config file. Read leniently: the point of ``reload`` is often
    to learn that the file is now invalid, and the admin address is still in it."""
    try:
        return load_file(path).admin.listen
    except ConfigError:
        pass
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        return parse_address(data["admin"]["listen"])
    except Exception:
        return DEFAULT_ADMIN


def _connectable(address: tuple[str, int]) -> tuple[str, int]:
    host, port = address
    # A wildcard bind is reached through loopback.
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host), port


def post_reload(address: tuple[str, int], timeout: float = 30.0) -> dict[str, Any]:
    """POST /reload; the JSON answer when it reloaded or was unchanged, else AdminError."""
    url = f"http://{format_address(_connectable(address))}/reload"
    request = urllib.request.Request(url, method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
        except ValueError:
            body = {}
        finally:
            exc.close()
        lines = [f"{url}: reload {body.get('status', 'failed')} (HTTP {exc.code})"]
        file = body.get("file", "")
        for error in body.get("errors", []):
            where = f"{error.get('path')}: " if error.get("path") else ""
            lines.append(f"  {file}: {where}{error.get('reason')}")
        raise AdminError("\n".join(lines)) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"{url}: cannot reach the admin API: {reason}") from None


def _admin_address(args: argparse.Namespace) -> tuple[str, int] | None:
    """Where a running instance's admin API is: --admin, else the file's admin.listen, else
    the default. None (after saying why) when the file does not tell."""
    if args.admin is not None:
        return args.admin
    if args.config is not None:
        address = _admin_from_file(args.config)
        if address[1] == 0:
            print(f"{args.config}: admin.listen uses port 0; pass --admin HOST:PORT", file=sys.stderr)
            return None
        return address
    return DEFAULT_ADMIN


def cmd_reload(args: argparse.Namespace) -> int:
    address = _admin_address(args)
    if address is None:
        return 1
    try:
        result = post_reload(address)
    except AdminError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{result.get('status')} (hash {result.get('hash')})")
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    address = _admin_address(args)
    if address is None:
        return 1
    from pointsman import top  # only this command needs it

    return top.run(
        _connectable(address),
        interval=args.interval,
        once=args.once,
        color=False if args.no_color else None,
    )


def cmd_status(args: argparse.Namespace) -> int:
    address = _admin_address(args)
    if address is None:
        return 1
    from pointsman import status  # only this command needs it

    try:
        summary = status.summarize(status.fetch(_connectable(address)))
    except AdminError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(status.render(summary, admin=format_address(address)))
    return 0


def _get_logs(address: tuple[str, int], alloc: str, query: str) -> tuple[bytes, int]:
    url = f"http://{format_address(_connectable(address))}/allocations/{urllib.parse.quote(alloc)}/logs?{query}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read(), int(response.headers.get("X-Pointsman-Log-Size", "0"))
    except urllib.error.HTTPError as exc:
        try:
            errors = json.loads(exc.read()).get("errors", [])
        except ValueError:
            errors = []
        finally:
            exc.close()
        reason = "; ".join(str(e.get("reason")) for e in errors) or f"HTTP {exc.code}"
        raise AdminError(f"{alloc}: {reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise AdminError(f"{url}: cannot reach the admin API: {getattr(exc, 'reason', exc)}") from None


def cmd_logs(args: argparse.Namespace) -> int:
    address = _admin_address(args)
    if address is None:
        return 1
    stream = "stderr" if args.stderr else "stdout"
    out = sys.stdout.buffer
    try:
        body, size = _get_logs(address, args.alloc, f"stream={stream}&tail={args.tail}")
        out.write(body)
        out.flush()
        while args.follow:
            time.sleep(0.5)
            body, now = _get_logs(address, args.alloc, f"stream={stream}&offset={size}")
            if now < size:  # the file was truncated or replaced: start over
                body, now = _get_logs(address, args.alloc, f"stream={stream}&offset=0")
            out.write(body)
            out.flush()
            size = now
    except AdminError as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


# -- arguments -------------------------------------------------------------------------


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    # Below 0.1 s the view only loads the admin API: the rates move once a second.
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} is not between 0.1 and 3600 seconds")
    return value


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _admin_target(parser: argparse.ArgumentParser) -> None:
    """--admin HOST:PORT or --config FILE: which running instance a client command talks to
    (resolved by `_admin_address`)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--admin", type=_address, metavar="HOST:PORT", help="the instance's admin API (default: 127.0.0.1:9901)"
    )
    where.add_argument("--config", metavar="FILE", help="read the admin address from this file's admin.listen")


def build_parser() -> argparse.ArgumentParser:
    # --log-level is accepted before or after the subcommand; SUPPRESS keeps the
    # subcommand's copy from overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: info)",
    )
    parser = argparse.ArgumentParser(prog="pointsman", description="An asyncio platform layer.", parents=[common])
    parser.add_argument("--version", action="version", version=f"pointsman {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def serving(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[common])
        sub.add_argument("--config", required=True, metavar="FILE", help="config file (YAML)")
        sub.add_argument(
            "--drain-timeout",
            type=float,
            default=DEFAULT_DRAIN_TIMEOUT,
            metavar="SECONDS",
            help="on SIGTERM/SIGINT, how long in-flight requests may finish (default: %(default)s)",
        )
        sub.add_argument(
            "--watch-interval",
            type=float,
            default=0.5,
            metavar="SECONDS",
            help="how often the config file is checked for changes (default: %(default)s)",
        )
        sub.add_argument("--no-watch", action="store_true", help="reload on SIGHUP and POST /reload only")
        return sub

    serving("up", "run every component the config file configures").set_defaults(func=cmd_up)
    serving("router", "run the router's listeners and the admin API").set_defaults(func=cmd_router)
    serving("dns", "run the service registry, its API and the DNS server (the discovery section)").set_defaults(
        func=cmd_dns
    )

    sidecar = serving(
        "sidecar",
        "local listeners for an app pointsman does not run (the file's sidecars:), following a registry",
    )
    sidecar.add_argument("--app", required=True, metavar="NAME", help="the sidecars[] entry to run")
    sidecar.set_defaults(func=cmd_sidecar)

    check = commands.add_parser("check-config", help="validate config files", parents=[common])
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(func=cmd_check_config)

    schema = commands.add_parser("schema", help="print the config's JSON Schema", parents=[common])
    schema.set_defaults(func=cmd_schema)

    plan = commands.add_parser(
        "plan",
        help="show where the file's jobs would be placed, and why an instance cannot be",
        description="Place the file's jobs on its nodes (no existing allocations) and print the plan. "
        "Exit 0 if every instance was placed, 2 if some could not be, 1 for an invalid file.",
        parents=[common],
    )
    plan.add_argument("file", metavar="FILE", help="config file (YAML)")
    plan.add_argument("--job", metavar="NAME", help="plan this job only (and the jobs it is near)")
    plan.add_argument(
        "--eval-id", default="", metavar="ID", help="seed of the placement: the same id gives the same plan"
    )
    plan.set_defaults(func=cmd_plan)

    reload = commands.add_parser("reload", help="make a running instance reload its config file", parents=[common])
    _admin_target(reload)
    reload.set_defaults(func=cmd_reload)

    top = commands.add_parser(
        "top",
        help="live view of the SQL listeners (statements per app and verb, latency, denials) and HTTP routes",
        description="A live view of a running instance's SQL listeners and HTTP routes, from its "
        "GET /sql/stats and GET /http/stats.",
        parents=[common],
    )
    _admin_target(top)
    top.add_argument(
        "--interval",
        type=_interval,
        default=1.0,
        metavar="SECONDS",
        help="time between refreshes (default: %(default)s)",
    )
    top.add_argument("--once", action="store_true", help="print one frame and exit (1 if the API is unreachable)")
    top.add_argument("--no-color", action="store_true", help="no ANSI colours (also off when $NO_COLOR is set)")
    top.set_defaults(func=cmd_top)

    status = commands.add_parser(
        "status",
        help="a running instance at a glance: jobs, allocations, services, listeners, clusters, last reload",
        description="What a running instance runs and how healthy it is, from its admin API. "
        "Exit 1 if the admin API cannot be reached.",
        parents=[common],
    )
    _admin_target(status)
    status.add_argument(
        "--json", action="store_true", help="one JSON object {jobs, allocations, services, listeners, clusters, reload}"
    )
    status.set_defaults(func=cmd_status)

    logs = commands.add_parser(
        "logs",
        help="print the output of an allocation's task (GET /allocations/ID/logs)",
        description="Print what an allocation's task wrote (stdout by default) from a running instance.",
        parents=[common],
    )
    logs.add_argument("alloc", metavar="ALLOC", help="allocation id, or a unique prefix of one")
    logs.add_argument("--stderr", action="store_true", help="stderr instead of stdout")
    logs.add_argument("--tail", type=int, default=64 * 1024, metavar="BYTES", help="last BYTES only (0: all)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing what the task writes")
    _admin_target(logs)
    logs.set_defaults(func=cmd_logs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "log_level"):
        # Not set_defaults(): the parent's action is shared with every subcommand, and a
        # default there would overwrite a --log-level given before the subcommand.
        args.log_level = "info"
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # `pointsman schema | head`: the reader left; exit quietly instead of a traceback
        # (and keep the interpreter's final flush from raising again).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
