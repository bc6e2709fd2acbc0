"""The `monitor-cifar` flow: is the served model seeing what it was registered on?

    prefect deployment run monitor-cifar/hourly            (the stack runs it every hour)
    python -c "from flows.monitor import monitor_cifar; print(monitor_cifar(records='DIR', hours=None))"

It reads a window of answer records (the last `hours`; None: every record), keeps the watched
version's answers (default: the champion's) and tests them against that version's reference,
its validation answers (cifarlab/drift.py: class mix, each class probability, confidence, the
out-of-distribution rate, the image statistics; Benjamini-Hochberg adjusted). The result:
  - an MLflow run in `cifar10-monitoring` (registry/monitoring.py): metrics, report.html, plots;
  - a Prefect artifact `drift-monitor` with the verdict and the window's time series (class mix,
    confidence, out-of-distribution rate, live accuracy from feedback with its 95 % interval);
  - on drift, the Prefect event `cifar.drift.detected` on resource `cifar.model.<registered
    model>` naming the version and the tests that fired (prefect.yaml retrains on it);
  - its return value: {"drift": bool, "fired": [...], ...}.
Records come from `records` (a folder), else this host's prediction log when it has one (one
machine: `make serve` writes it), else the files serving hosts shipped to the tracking server.
"""

from __future__ import annotations

import base64
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from cifarlab.constants import CLASS_NAMES
from cifarlab.drift import ALPHA, compare, window_arrays
from cifarlab.drift_report import html_report, plot_series, series, verdict_rows
from flows.common import project_root
from registry import monitoring, tracking

DRIFT_EVENT = "cifar.drift.detected"
# Serving hosts ship closed files: a file closes after CIFAR_PREDICTION_LOG_FILE_MINUTES (10) and
# `cifar-import-champion --follow 60` ships it within a minute. A window of shipped records
# ends this long ago, so that its answers have all arrived.
SHIPPED_LAG_MINUTES = 15.0
FILE_SLACK_S = 3600.0


def model_resource(name: str = tracking.REGISTERED_MODEL) -> dict[str, str]:
    """The Prefect event resource of a registered model: one retraining cool-down each."""
    return {"prefect.resource.id": f"cifar.model.{name}", "prefect.resource.name": name}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def local_log() -> Path | None:
    """This host's prediction log folder (where its service writes: serving/logfiles.py), if
    it has one."""
    from serving.logfiles import default_folder

    folder = default_folder()
    return folder if folder.is_dir() else None


def _days(start: float | None, end: float) -> set[str] | None:
    """The log's day folders (a file's opening day, UTC) that can hold answers of the window."""
    if start is None:
        return None
    # A file holds at most CIFAR_PREDICTION_LOG_FILE_MINUTES of answers: one opened an hour
    # before the window cannot hold any of them.
    first = datetime.fromtimestamp(start - FILE_SLACK_S, UTC).date()
    last = datetime.fromtimestamp(end, UTC).date()
    return {(first + timedelta(days=d)).strftime("%Y%m%d") for d in range((last - first).days + 1)}


def _records(
    root: Path, records: str | None, tmp: Path, since: float | None
) -> tuple[Iterator[dict[str, Any]], str, bool]:
    """(the records of files opened after `since` less an hour, where they came from, whether
    serving hosts shipped them)."""
    from registry.ship_records import download_records
    from serving.logfiles import read_records

    after = since - FILE_SLACK_S if since is not None else None
    if records is not None:
        if not Path(records).is_dir():
            raise ValueError(f"records={records!r}: no such folder")
        return read_records(Path(records), opened_after=after), str(records), False
    here = local_log()
    if here is not None:
        return read_records(here, opened_after=after), str(here), False
    store = tracking.open_store(root)
    download_records(root, tmp, store.uri, _days(since, time.time()))
    shipped = read_records(tmp, opened_after=after)
    return shipped, f"shipped to {tracking.display_uri(store.uri)}", True


@flow(name="monitor-cifar", log_prints=True)
def monitor_cifar(
    records: str | None = None,
    hours: Annotated[float, Field(gt=0)] | None = 1.0,
    lag_minutes: Annotated[float, Field(ge=0)] | None = None,
    model_version: str | None = None,
    min_images: Annotated[int, Field(ge=1)] = 200,
    alpha: Annotated[float, Field(gt=0, lt=1)] = ALPHA,
    root: str | None = None,
) -> dict[str, Any]:
    """Test `hours` of answers of the champion (or `model_version`) against its reference,
    ending `lag_minutes` ago (default: 0, or SHIPPED_LAG_MINUTES for records shipped by
    serving hosts, which arrive in closed files); report to MLflow and Prefect, and emit
    `cifar.drift.detected` on drift of the champion."""
    logger = get_run_logger()
    root_dir = project_root(root)
    store = tracking.open_store(root_dir)
    version = monitoring.watched_version(store, model_version)
    if version is None:
        logger.info("%s has no champion yet: nothing to watch", tracking.REGISTERED_MODEL)
        return {"drift": False, "fired": [], "tested": False, "model_version": None}
    ref = monitoring.load_reference(store, version)
    vid = str(version.version)
    now = _window_end()
    with tempfile.TemporaryDirectory() as tmp:
        guess = now - 60 * (SHIPPED_LAG_MINUTES if lag_minutes is None else lag_minutes)
        found, source, shipped = _records(
            root_dir, records, Path(tmp), guess - hours * 3600 if hours else None
        )
        rows = [r for r in found if str(r.get("model_version")) == vid]
    lag = SHIPPED_LAG_MINUTES if lag_minutes is None and shipped else (lag_minutes or 0.0)
    end = now - lag * 60
    start = end - hours * 3600 if hours else _first_time(rows, end)
    preds, feedback = monitoring.window(rows, start, end)
    champion = version if model_version is None else monitoring.watched_version(store)
    context = {"model_version": vid, "champion": champion is not None and
               str(champion.version) == vid, "window_start": _iso(start), "window_end": _iso(end),
               "records": source, "answers": len(preds), "feedback": len(feedback),
               "alpha": alpha}  # fmt: skip
    if len(preds) < min_images:
        note = f"{len(preds)} answers of v{vid} in the window (< {min_images}): not tested"
        logger.info(note)
        create_markdown_artifact(key="drift-monitor", markdown=f"# Drift monitor\n\n{note}\n",
                                 description="not enough answers")  # fmt: skip
        return {**context, "drift": False, "fired": [], "tested": False, "mlflow_run_id": None}
    return _check(root_dir, store, ref, preds, feedback, context, (start, end))


def _check(
    root_dir: Path,
    store: tracking.Store,
    ref: dict[str, Any],
    preds: list[dict[str, Any]],
    feedback: list[dict[str, Any]],
    context: dict[str, Any],
    window: tuple[float, float],
) -> dict[str, Any]:
    """Test, report (MLflow run, Prefect artifact), emit the event on the champion's drift."""
    vid = context["model_version"]
    verdict = compare(ref, window_arrays(preds), CLASS_NAMES, context["alpha"])
    s = series(preds, feedback, CLASS_NAMES, *window)
    with tempfile.TemporaryDirectory() as tmp:
        title = f"v{vid}, {context['window_start']} to {context['window_end']}"
        png = plot_series(s, CLASS_NAMES, Path(tmp) / "series.png", title)
        page = Path(tmp) / "report.html"
        page.write_text(html_report(verdict, context, png))
        try:
            run_id = monitoring.log_check(root_dir, store.uri, verdict, s, context,
                                          {"report": page, "plot": png})  # fmt: skip
        except Exception:
            if verdict.drift and context["champion"]:  # the alarm goes out all the same
                _emit({**context, "fired": verdict.fired, "mlflow_run_id": None})
            raise
        _artifact(verdict, context, png, run_id)
    out = {**context, "drift": verdict.drift, "fired": verdict.fired, "tested": True,
           "summary": verdict.summary, "mlflow_run_id": run_id}  # fmt: skip
    get_run_logger().info("v%s, %d answers: %s", vid, len(preds),
                f"DRIFT ({', '.join(verdict.fired)})" if verdict.drift else "no drift")  # fmt: skip
    if verdict.drift and context["champion"]:  # an old version's drift retrains nothing
        _emit(out)
    return out


def _window_end() -> float:
    """Now, or a scheduled run's scheduled time: hourly windows meet even when a run starts late."""
    from prefect.runtime import deployment, flow_run

    scheduled = flow_run.scheduled_start_time if deployment.id else None
    return min(time.time(), scheduled.timestamp()) if scheduled else time.time()


def _first_time(rows: list[dict[str, Any]], default: float) -> float:
    from cifarlab.drift_report import parse_time

    times = [parse_time(r["time"]) for r in rows if r.get("kind", "prediction") == "prediction"]
    return min(times, default=default)


def _emit(out: dict[str, Any]) -> None:
    from prefect.events import emit_event

    emit_event(
        event=DRIFT_EVENT,
        resource={**model_resource(), "cifar.model.version": str(out["model_version"])},
        payload={
            k: out[k]
            for k in (
                "model_version",
                "fired",
                "answers",
                "window_start",
                "window_end",
                "mlflow_run_id",
            )
        },  # fmt: skip
    )


def _artifact(verdict: Any, context: dict[str, Any], png: Path, run_id: str) -> None:
    rows = verdict_rows(verdict)
    n = len(verdict.fired)
    state = f"DRIFT ({n} test{'s' if n > 1 else ''} fired)" if verdict.drift else "no drift"
    fired = f"Fired: {', '.join(verdict.fired)}\n\n" if verdict.drift else ""
    table = "\n".join(
        f"| {r['test']} | {r['statistic']} | {r['p_adjusted']:.3g} | {'yes' if r['fired'] else ''} |"
        for r in rows[:8]
    )
    data = base64.b64encode(png.read_bytes()).decode()
    facts = "\n".join(f"- {k}: {v}" for k, v in context.items())
    markdown = (
        f"# Drift monitor: {state}\n\n{fired}{facts}\n- MLflow run: `{run_id}` (report.html)\n\n"
        f"| test | statistic | p adjusted | fired |\n|---|---|---|---|\n{table}\n\n"
        f"![class mix, confidence, out-of-distribution rate, live accuracy]"
        f"(data:image/png;base64,{data})\n"
    )
    create_markdown_artifact(
        key="drift-monitor",
        markdown=markdown,
        description=f"v{context['model_version']}: {'drift' if verdict.drift else 'no drift'}",
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.monitor` (`make monitor`): one check, its verdict as JSON."""
    import argparse
    import json
    import sys

    from mlflow.exceptions import MlflowException

    parser = argparse.ArgumentParser(
        prog="python -m flows.monitor", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--records", help="a folder of records (default: as the flow finds them)")
    parser.add_argument("--hours", type=float, default=1.0, help="window; 0: every record")
    parser.add_argument("--lag-minutes", type=float, help="the window ends this long ago")
    parser.add_argument("--version", help="the registry version (default: the champion)")
    parser.add_argument("--min-images", type=int, default=200)
    args = parser.parse_args(argv)
    if args.hours < 0 or (args.lag_minutes or 0) < 0 or args.min_images < 1:
        parser.error("--hours and --lag-minutes must be >= 0, --min-images >= 1")
    try:
        out = monitor_cifar(records=args.records, hours=args.hours or None,
                            lag_minutes=args.lag_minutes, model_version=args.version,
                            min_images=args.min_images)  # fmt: skip
    except (ValueError, monitoring.NoReference, tracking.TrackingUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MlflowException as exc:  # the tracking server failed to answer (e.g. its store)
        print(f"error: MLflow: {exc.message}"[:2000], file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
