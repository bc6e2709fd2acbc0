"""The stacks on loopback and on many hosts: Prefect server, work pools, workers, deployments.

    python -m stacks up                 # the embedded default: Prefect server on SQLite, one
                                        # worker per pool, MLflow on sqlite:///mlflow.db
    python -m stacks run [--deployment default] [-p preset=seed-baseline ...]
                                        # start, run one deployment to the end, stop
    python -m stacks team               # the team stack: PostgreSQL, Prefect server and MLflow
                                        # tracking server on it (auth on), pools, deployments;
                                        # writes the join file workers and serving hosts need
    python -m stacks worker --join team.env [--gpus 1] [--name NAME]
                                        # a GPU host joins: trains what the `gpu` pool hands it
    python -m stacks reap [--every 30]  # fail MLflow runs left RUNNING by ended flow runs (the
                                        # team stack runs it; flow runs silent for 5 min are
                                        # crashed by a Prefect automation)

Two work pools. `gpu`: every `train-cifar` run; each host's worker takes at most `--gpus` runs
at a time (`prefect worker start --limit`), so N hosts train N runs at once and no host trains
two on one GPU. `control`: the `sweep-cifar` runs, which only orchestrate (they start
`train-cifar` runs, wait, summarise, register); they never hold a GPU host's slot.

State (Prefect's database, logs) lives under `<root>/.prefect` (`<root>/.team` for the team
stack). Processes are started in their own process groups and stopped as groups, so no worker or
flow run outlives the stack (stacks/processes.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

from stacks.local import (
    CONTROL_POOL,
    JOIN_KEYS,
    PROJECT_ROOT,
    LocalStack,
    default_gpus,
    tracking_host,
)
from stacks.processes import StackError, handle_stop_signals, wait_for_signal
from stacks.reaper import reap, run_reaper
from stacks.team import TeamStack, read_env_file, run_worker


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stacks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the local stack and keep it running (Ctrl-C stops it)")
    run = sub.add_parser("run", help="start the local stack, run one deployment, stop")
    run.add_argument(
        "--deployment",
        default="default",
        help="train-cifar deployment, or FLOW/DEPLOYMENT (e.g. sweep-cifar/default)",
    )
    run.add_argument(
        "-p",
        "--param",
        dest="params",
        action="append",
        default=[],
        help="flow parameter KEY=VALUE (JSON values), e.g. preset=seed-baseline",
    )
    team = _team_parser(sub)
    reaper = sub.add_parser(
        "reap",
        help="fail the MLflow runs whose flow runs ended without them (the team stack runs this)",
    )
    reaper.add_argument(
        "--every", type=float, default=0, help="repeat every this many seconds (default: once)"
    )
    worker = _worker_parser(sub)
    for p in (up, run, team):
        p.add_argument(
            "--prefect-file",
            type=Path,
            default=None,
            help="the deployments' prefect.yaml (default: this checkout's)",
        )
    for p in (up, run, team, worker, reaper):
        p.add_argument(
            "--port",
            type=int,
            default=int(os.environ.get("PREFECT_PORT", 4200)),
            help="Prefect server port (up, run, team)",
        )
        p.add_argument(
            "--root", type=Path, default=Path(os.environ.get("CIFAR_ROOT", PROJECT_ROOT))
        )
    return parser


def _team_parser(sub: Any) -> argparse.ArgumentParser:
    team = sub.add_parser(
        "team",
        help="start the team stack (PostgreSQL, Prefect, MLflow servers) and keep it running",
    )
    team.add_argument(
        "--bind",
        default="127.0.0.1",
        help="address the servers listen on (0.0.0.0 to let other hosts in)",
    )
    team.add_argument(
        "--advertise",
        help="host name other hosts use (default: --bind, or "
        "this host's name when binding 0.0.0.0)",
    )
    team.add_argument("--mlflow-port", type=int, default=5000)
    team.add_argument("--pg-port", type=int, default=5433)
    team.add_argument(
        "--s3-port",
        type=int,
        default=8333,
        help="the S3 port of the stack's SeaweedFS on 127.0.0.1 (not started when "
        "CIFAR_S3_ENDPOINT names the team's own S3; see docs/team-stack.md)",
    )
    team.add_argument(
        "--database-url",
        default=os.environ.get("CIFAR_DATABASE_URL"),
        help="postgresql://USER:PASSWORD@HOST:PORT of your own PostgreSQL "
        "(default: start one in <root>/.team/postgres)",
    )
    team.add_argument(
        "--with-worker", action="store_true", help="also run a GPU worker on this host"
    )
    return team


def _worker_parser(sub: Any) -> argparse.ArgumentParser:
    worker = sub.add_parser("worker", help="join a team stack as a GPU host")
    worker.add_argument(
        "--join",
        type=Path,
        default=os.environ.get("CIFAR_JOIN_FILE"),
        help="the team stack's join file (team.env); else the PREFECT_* and "
        "MLFLOW_* variables of the environment",
    )
    worker.add_argument("--name", help="this host's name on runs (default: hostname)")
    worker.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="trainings at once on this worker (default 1; a run trains on the "
        "first visible GPU: one worker per GPU with CUDA_VISIBLE_DEVICES)",
    )
    worker.add_argument(
        "--serving-host",
        action="store_true",
        help="also copy each new champion into this host's BentoML store",
    )
    return worker


def main(argv: list[str] | None = None) -> int:
    """Command line of the stacks."""
    args = _parser().parse_args(argv)

    try:
        if args.command == "reap":
            if args.every > 0:
                return run_reaper(args.root.resolve(), args.every)
            reap(args.root.resolve(), tracking_host())
            return 0
        if args.command == "worker":
            join = (
                read_env_file(args.join)
                if args.join
                else {k: os.environ[k] for k in JOIN_KEYS if os.environ.get(k)}
            )
            root = args.root.resolve()
            return run_worker(
                join,
                root,
                args.gpus or default_gpus(),
                args.name,
                args.serving_host,
                root / ".prefect-worker" / "logs",
            )
        if args.command == "team":
            stack: LocalStack = TeamStack(
                args.root,
                bind=args.bind,
                advertise=args.advertise,
                prefect_port=args.port,
                mlflow_port=args.mlflow_port,
                pg_port=args.pg_port,
                s3_port=args.s3_port,
                database_url=args.database_url,
                local_gpu_worker=args.with_worker,
                prefect_file=args.prefect_file,
            )
        else:
            stack = LocalStack(root=args.root, port=args.port, prefect_file=args.prefect_file)
        return _run_stack(stack, args)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


class _Stopped(KeyboardInterrupt):
    """Ctrl-C, SIGTERM (a timeout, a supervisor) or SIGHUP (a closed terminal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, _frame: object) -> None:
    # Further signals are ignored from here on: the stop that follows must not be cut short
    # (it is bounded: each service gets its grace, then SIGKILL).
    handle_stop_signals(signal.SIG_IGN)
    raise _Stopped(signum)


def _run_stack(stack: LocalStack, args: argparse.Namespace) -> int:
    """Start the stack, do the command's work, stop the stack. Ctrl-C, SIGTERM or SIGHUP stop
    it: workers, their flow runs and the servers go down, nothing stays behind. `run` (a job
    cut short) then exits with 128 + the signal's number; `up` and `team` (servers asked to
    stop) exit 0."""
    handle_stop_signals(_interrupt)
    try:
        with stack.running():
            return _foreground(stack, args)
    except KeyboardInterrupt as stopped:
        # A signal that landed before the stop had switched signals off cut it short: stop
        # again (each service is stopped once; the rest are still to do).
        stack.stop()
        with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
            print(
                f"stopped by {stopped or 'SIGINT'}; the stack is down", file=sys.stderr, flush=True
            )
        return 128 + getattr(stopped, "signum", signal.SIGINT)
    finally:
        handle_stop_signals(signal.SIG_IGN)


def _foreground(stack: LocalStack, args: argparse.Namespace) -> int:
    if isinstance(stack, TeamStack):
        from registry.tracking import display_uri

        print(
            f"team stack up: Prefect {stack.api_url.removesuffix('/api')} (UI; log in with the "
            f"auth string), MLflow {display_uri(stack.mlflow_url)} (user admin), PostgreSQL "
            f"{'on ' + display_uri(stack.database_url) if stack.database_url else 'in ' + str(stack.folder / 'postgres')}; "
            f"logs in {stack.logs}",
            flush=True,
        )
        print(
            f"join file (URLs and credentials): {stack.join_file}\n"
            f"  GPU host:     python -m stacks worker --join team.env   (or make worker JOIN=team.env)\n"
            f"  serving host: set -a; . ./team.env; set +a; cifar-import-champion && make serve",
            flush=True,
        )
    else:
        print(
            f"Prefect server {stack.api_url.removesuffix('/api')} (UI), work pools "
            f"'{stack.pool}' and '{CONTROL_POOL}', workers running; logs in {stack.logs}",
            flush=True,
        )
    if args.command in ("up", "team"):
        if args.command == "up":
            print(
                f"export PREFECT_API_URL={stack.api_url}  # then: prefect deployment run "
                "train-cifar/default --watch",
                flush=True,
            )
        dead = wait_for_signal(stack.services.dead)
        if dead:
            print(f"error: {dead} stopped; stopping the stack", file=sys.stderr, flush=True)
            return 1
        return 0
    # No time limit: a full-scale study runs for hours (Ctrl-C stops it and the stack). Its
    # log lines (epochs, time left, the closing summary) are printed as they come.
    return 0 if stack.follow_deployment(args.deployment, args.params).ok else 1
