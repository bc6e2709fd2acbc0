"""The team's object store (stacks/objectstore.py): a real SeaweedFS on 127.0.0.1, its S3
credentials, and the errors a wrong one or a dead endpoint gives."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from stacks import postgres
from stacks.objectstore import BUCKET, LocalSeaweed, S3Store
from stacks.processes import Services, StackError, free_port
from tests.conftest import missing

ROOT = Path(__file__).resolve().parents[1]


def test_a_dead_endpoint_is_one_line_naming_it():
    store = S3Store(f"http://127.0.0.1:{free_port()}", "b", "k", "s")
    with pytest.raises(StackError, match=r"^object store http://127\.0\.0\.1:\d+: unreachable"):
        store.check()


def test_a_team_s3_needs_both_keys():
    assert S3Store.from_env({}) is None
    with pytest.raises(StackError, match="CIFAR_S3_ENDPOINT=http://s3.example:9000: also set"):
        S3Store.from_env({"CIFAR_S3_ENDPOINT": "http://s3.example:9000"})
    store = S3Store.from_env({"CIFAR_S3_ENDPOINT": "http://s3.example:9000",
                              "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})  # fmt: skip
    assert store is not None and store.bucket == BUCKET and store.destination.startswith("s3://")


@pytest.mark.e2e
def test_seaweedfs_serves_its_bucket_to_its_keys_only(tmp_path):
    keys = {
        k: secrets.token_urlsafe(16) for k in ("S3_ACCESS_KEY", "S3_SECRET_KEY", "S3_FILER_KEY")
    }
    seaweed = LocalSeaweed(tmp_path / "sw", free_port(), keys)
    services = Services(tmp_path / "logs", dict(os.environ))
    try:
        store = seaweed.start(services, tmp_path / "logs" / "seaweedfs.log")
        proc = services.procs["seaweedfs"]
        s3 = store.client()
        s3.put_object(Bucket=store.bucket, Key="mlartifacts/x.bin", Body=b"x" * 1000)
        assert (
            s3.get_object(Bucket=store.bucket, Key="mlartifacts/x.bin")["Body"].read()
            == b"x" * 1000
        )
        store.check(create=True)  # a second start finds its bucket
        wrong = S3Store(store.endpoint, store.bucket, store.access_key, "not-the-secret")
        with pytest.raises(StackError, match=r"bucket cifar10-mlops: refused \(403\)"):
            wrong.check()
        # Nobody reads around the S3 keys: the S3 gateway and the filer refuse anonymous reads.
        filer = f"http://127.0.0.1:{seaweed.ports['filer']}/buckets/{BUCKET}/mlartifacts/x.bin"
        for url, code in ((f"{store.endpoint}/{BUCKET}/mlartifacts/x.bin", 403), (filer, 401)):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url, timeout=10)
            assert refused.value.code == code, url
        assert (tmp_path / "sw" / "s3.json").stat().st_mode & 0o777 == 0o600
    finally:
        services.stop_all(graces={"seaweedfs": 35})
    assert proc.poll() is not None


@pytest.mark.e2e
def test_a_team_s3_with_a_wrong_key_stops_the_team_stack_in_one_line(tmp_path):
    """`make team-stack` pointed at the team's own S3 (here a real SeaweedFS) with a wrong
    secret: one line naming the store, exit code 2, nothing left running."""
    from tests.test_team_e2e import _processes_of

    try:
        postgres.find_bindir()
    except postgres.PostgresError as exc:
        missing("PostgreSQL", str(exc))
    keys = {
        k: secrets.token_urlsafe(16) for k in ("S3_ACCESS_KEY", "S3_SECRET_KEY", "S3_FILER_KEY")
    }
    services = Services(tmp_path / "logs", dict(os.environ))
    try:
        store = LocalSeaweed(tmp_path / "sw", free_port(), keys).start(
            services, tmp_path / "logs" / "seaweedfs.log"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
        env |= {"CIFAR_S3_ENDPOINT": store.endpoint, "CIFAR_S3_ACCESS_KEY": store.access_key,
                "CIFAR_S3_SECRET_KEY": "not-the-secret", "PREFECT_UI_ENABLED": "false"}  # fmt: skip
        ports = [str(free_port()) for _ in range(3)]
        started = subprocess.run(
            [sys.executable, "-m", "stacks", "team", "--root", str(tmp_path / "root"),
             "--port", ports[0], "--mlflow-port", ports[1], "--pg-port", ports[2]],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        services.stop_all(graces={"seaweedfs": 35})
    assert started.returncode == 2, started.stderr[-3000:]
    assert "Traceback" not in started.stderr, started.stderr[-3000:]
    assert started.stderr.strip().splitlines()[-1] == (
        f"error: stack start failed at step 'object store': object store {store.endpoint}, "
        f"bucket {BUCKET}: refused (403): check its access key and secret; every process it "
        "had started is stopped"
    )
    assert _processes_of(tmp_path / "root") == []


def test_a_team_s3_keys_go_to_the_tracking_server_alone(tmp_path, monkeypatch):
    from stacks.team import TeamStack

    monkeypatch.setenv("CIFAR_S3_ENDPOINT", "http://s3.example:9000")
    monkeypatch.setenv("CIFAR_S3_ACCESS_KEY", "team-key")
    monkeypatch.setenv("CIFAR_S3_SECRET_KEY", "team-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token")
    monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/team-ca.pem")
    stack = TeamStack(tmp_path, folder=tmp_path / ".team")
    assert stack.seaweed is None and stack.object_store is not None
    for env in (stack.env, stack.services.env):  # what every service and flow run gets
        assert not {"CIFAR_S3_ACCESS_KEY", "CIFAR_S3_SECRET_KEY", "AWS_SESSION_TOKEN"} & set(env)
        assert env["AWS_CA_BUNDLE"] == "/etc/team-ca.pem"  # a setting, not a secret: kept
    started = []
    stack.services.spawn = lambda name, args, env=None, **kw: started.append(env)  # type: ignore[method-assign]
    stack.procs["mlflow"] = None
    import stacks.team

    monkeypatch.setattr(stacks.team, "wait_http", lambda *a, **kw: None)
    stack.start_mlflow_server(SimpleNamespace(url=lambda name: f"postgresql://db/{name}"))
    (server,) = started
    assert (
        server["AWS_SECRET_ACCESS_KEY"] == "team-secret" and server["AWS_SESSION_TOKEN"] == "token"
    )
    assert server["MLFLOW_S3_ENDPOINT_URL"] == "http://s3.example:9000"
    assert server["AWS_CA_BUNDLE"] == "/etc/team-ca.pem"
