"""A stack's Prefect server as its Python client and REST API see it: deployment runs started,
followed and waited for, without parsing anything Prefect's CLI prints for people."""

from __future__ import annotations

import base64
import contextlib
import json
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from stacks.processes import StackError

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import State


class PrefectApi:
    """The Prefect server at `api_url` (with $PREFECT_API_AUTH_STRING of `env`, if any)."""

    api_url: str
    env: Mapping[str, str]

    @contextlib.contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        """Prefect's own Python client, pointed at this stack's server (and its auth string)."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        settings: dict = {PREFECT_API_URL: self.api_url}
        if self.env.get("PREFECT_API_AUTH_STRING"):
            settings[PREFECT_API_AUTH_STRING] = self.env["PREFECT_API_AUTH_STRING"]
        with temporary_settings(updates=settings), get_client(sync_client=True) as client:
            yield client

    def api(self, path: str, body: object | None = None) -> object:
        """GET (or, with a JSON `body`, POST) `path` of this stack's Prefect REST API."""
        headers = {"Content-Type": "application/json"}
        if self.env.get("PREFECT_API_AUTH_STRING"):
            token = base64.b64encode(self.env["PREFECT_API_AUTH_STRING"].encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.api_url}{path}", data=data, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.load(resp)

    def start_deployment(self, deployment: str, params: Sequence[str] = ()) -> str:
        """Create a flow run of a deployment (params as KEY=VALUE, JSON values, as `prefect
        deployment run --param` takes them); returns its id. A bare deployment name means a
        `train-cifar` one. Unknown parameters and values the flow refuses raise StackError."""
        from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

        name = deployment if "/" in deployment else f"train-cifar/{deployment}"
        parameters = parse_params(params)
        with self.client() as client:
            try:
                found = client.read_deployment_by_name(name)
            except ObjectNotFound:
                raise StackError(
                    f"no deployment {name!r} on {self.api_url} (prefect.yaml "
                    "declares the deployments)"
                ) from None
            known = set((found.parameter_openapi_schema or {}).get("properties", {}))
            unknown = sorted(set(parameters) - known)
            if unknown:
                raise StackError(
                    f"{name} has no parameter {', '.join(map(repr, unknown))}; "
                    f"it takes {', '.join(sorted(known)) or 'none'}"
                )
            try:
                flow_run = client.create_flow_run_from_deployment(found.id, parameters=parameters)
            except PrefectHTTPStatusError as exc:
                raise StackError(f"{name}: {_http_detail(exc)}") from None
        return str(flow_run.id)

    def flow_run_state(self, flow_run_id: str) -> State | None:
        """A flow run's state (None before it has one)."""
        with self.client() as client:
            return client.read_flow_run(UUID(flow_run_id)).state

    def flow_run_logs(self, flow_run_id: str, offset: int = 0, limit: int = 200) -> list[Any]:
        """A flow run's log records (its tasks' included), oldest first, from `offset`."""
        with self.client() as client:
            return _read_logs(client, flow_run_id, offset=offset, limit=limit)

    def follow_deployment(
        self, deployment: str, params: Sequence[str] = (), out=sys.stdout, poll_s: float = 1.0
    ) -> DeploymentRun:
        """Start a deployment run and print its log lines (epochs, time left, the closing
        summary) as they arrive, until it ends; returns the ended run."""
        name = deployment if "/" in deployment else f"train-cifar/{deployment}"
        flow_run_id = self.start_deployment(deployment, params)
        print(
            f"flow run {flow_run_id} of {name}: Prefect UI "
            f"{self.api_url.removesuffix('/api')}/runs/flow-run/{flow_run_id}",
            file=out,
            flush=True,
        )
        seen, quiet_polls = 0, 0
        with self.client() as client:  # one client for the whole wait: two requests a poll
            while True:
                state = client.read_flow_run(UUID(flow_run_id)).state
                logs = _read_logs(client, flow_run_id, offset=seen)
                for log in logs:
                    print(f"{log.timestamp:%H:%M:%S} {log.message}", file=out, flush=True)
                seen += len(logs)
                if state is not None and state.is_final() and not logs:
                    if quiet_polls >= 2:  # the last lines are shipped a moment after the end
                        print(f"flow run {flow_run_id}: {state.name}", file=out, flush=True)
                        return DeploymentRun.of(flow_run_id, state, self)
                    quiet_polls += 1
                else:
                    quiet_polls = 0
                if not logs:
                    time.sleep(poll_s)

    def run_deployment(
        self, deployment: str, params: Sequence[str] = (), timeout: float | None = 3600
    ) -> DeploymentRun:
        """Start a deployment run and wait for its final state (params as KEY=VALUE); a bare
        deployment name means a `train-cifar` one. Raises TimeoutError after `timeout` s."""
        flow_run_id = self.start_deployment(deployment, params)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.client() as client:  # one client for the whole wait
            while (state := client.read_flow_run(UUID(flow_run_id)).state) is None or (
                not state.is_final()
            ):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"flow run {flow_run_id} of {deployment} still "
                        f"{state.name if state else 'without a state'} after {timeout:.0f} s"
                    )
                time.sleep(0.5)
        return DeploymentRun.of(flow_run_id, state, self)


@dataclass(frozen=True)
class DeploymentRun:
    """A flow run of a deployment that has ended: its id, its final state's name (Completed,
    Failed, TimedOut, Crashed, ...) and whether that state is a completed one."""

    flow_run_id: str
    state: str
    ok: bool
    stack: PrefectApi

    @classmethod
    def of(cls, flow_run_id: str, state: State, stack: PrefectApi) -> DeploymentRun:
        return cls(flow_run_id, str(state.name), state.is_completed(), stack)

    def log_text(self, last: int = 60) -> str:
        """Its last `last` log lines (at most 200: the server's page), for a failure's message."""
        with self.stack.client() as client:
            newest = _read_logs(client, self.flow_run_id, limit=min(last, 200), newest_first=True)
        lines = [f"{r.timestamp:%H:%M:%S} {r.level} {r.message}" for r in reversed(newest)]
        return f"flow run {self.flow_run_id}: {self.state}\n" + "\n".join(lines)


def _read_logs(client: SyncPrefectClient, flow_run_id: str, offset: int = 0, limit: int = 200,
               newest_first: bool = False) -> list[Any]:  # fmt: skip
    """A flow run's log records (its tasks' included), oldest first unless asked otherwise."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    return client.read_logs(
        LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(flow_run_id)])),
        sort=LogSort.TIMESTAMP_DESC if newest_first else LogSort.TIMESTAMP_ASC,
        offset=offset, limit=limit,
    )  # fmt: skip


def parse_params(params: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE strings with the values read as `prefect deployment run --param` reads them
    (as JSON; a value that is not JSON and holds no quote as a JSON string of itself, escapes
    decoded); a spec without `=` or a key, or a value that is broken JSON, is an error naming
    it."""
    out: dict[str, Any] = {}
    for spec in params:
        key, sep, value = spec.partition("=")
        if not sep or not key:
            raise StackError(f"parameter {spec!r}: expected KEY=VALUE")
        out[key] = _json_value(key, value)
    return out


def _json_value(key: str, value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError as exc:
        plain = "Extra data" in str(exc) or "Expecting value" in str(exc)
        if plain and '"' not in value:
            return _json_value(key, f'"{value}"')
        raise StackError(f"parameter {key}: {value!r} is not valid JSON ({exc})") from None


def _http_detail(exc: Exception) -> str:
    """The server's `detail` of an HTTP error, else the error itself."""
    try:
        return str(exc.response.json().get("detail") or exc)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - no JSON body: the error's own text
        return str(exc)
