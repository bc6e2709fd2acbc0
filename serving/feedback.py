"""Which answers the service gave, by request id, and the labels clients sent back for them.

One SQLite file beside the prediction log (`<log folder>/requests.sqlite`, WAL), shared by the
service's workers and kept across restarts: a label posted to any worker finds the answer
whichever worker gave it. Rows older than the log's retention period are deleted with it, so an
expired id is unknown (404). The first label for an id is kept; a second gets 409.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from serving.uploads import BadRequest

ANSWER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}(\.[0-9]{1,6})?")  # a request's, or a batch image's

_SCHEMA = """
PRAGMA auto_vacuum = INCREMENTAL;
CREATE TABLE IF NOT EXISTS answers (
    request_id TEXT PRIMARY KEY,
    time REAL NOT NULL,
    model_version TEXT,
    label TEXT,
    pixels BLOB
);
CREATE INDEX IF NOT EXISTS answers_time ON answers (time);
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    time REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Row:
    """One answered image: its id, when, which version, what it said (and its input, when
    feedback images are kept)."""

    request_id: str
    time: float
    model_version: str
    label: str
    pixels: bytes | None = None


@dataclass(frozen=True)
class Given:
    """What became of a label: `stored`, `unknown` (no such answer on record) or `duplicate`
    (`label` is the one stored first)."""

    status: str
    label: str | None = None
    predicted: str | None = None
    model_version: str | None = None
    answered: float | None = None
    pixels: bytes | None = None


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()  # one connection per thread
        self._connections: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        self._db().executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
            with self._guard:
                self._connections.append(db)
        return db

    def add(self, rows: list[Row]) -> None:
        """Index answered images; an id seen before keeps its first answer."""
        if not rows:
            return
        with self._transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?, ?)",
                [(r.request_id, r.time, r.model_version, r.label, r.pixels) for r in rows],
            )

    def knows(self, request_id: str, since: float = 0.0) -> bool:
        """Whether an answer `request_id` given at or after `since` is on record (a read: no
        write lock, so unknown ids cost the writers nothing)."""
        found = (
            self._db()
            .execute(
                "SELECT 1 FROM answers WHERE request_id = ? AND time >= ?", (request_id, since)
            )
            .fetchone()
        )
        return found is not None

    def give(
        self, request_id: str, label: str, now: float | None = None, since: float = 0.0
    ) -> Given:
        """Store `label` for the answer `request_id` (given at or after `since`: older ones
        are expired) unless it has one already."""
        now = time.time() if now is None else now
        # The check and the insert as one, across workers.
        with self._transaction() as db:
            answer = db.execute(
                "SELECT label, model_version, time, pixels FROM answers "
                "WHERE request_id = ? AND time >= ?",
                (request_id, since),
            ).fetchone()
            if answer is None:
                return Given("unknown")
            predicted, version, answered, pixels = answer
            stored = db.execute(
                "SELECT label FROM feedback WHERE request_id = ?", (request_id,)
            ).fetchone()
            if stored is not None:
                return Given("duplicate", stored[0], predicted, version, answered)
            db.execute("INSERT INTO feedback VALUES (?, ?, ?)", (request_id, label, now))
            return Given("stored", label, predicted, version, answered, pixels)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def expire(self, before: float, pixels_before: float | None = None) -> None:
        """Forget answers given before `before` (and their labels); drop the kept inputs of
        answers given before `pixels_before`; give the freed pages back to the disk."""
        with self._transaction() as db:
            db.execute(
                "DELETE FROM feedback WHERE request_id IN "
                "(SELECT request_id FROM answers WHERE time < ?)",
                (before,),
            )
            db.execute("DELETE FROM answers WHERE time < ?", (before,))
            if pixels_before is not None:
                db.execute(
                    "UPDATE answers SET pixels = NULL WHERE time < ? AND pixels IS NOT NULL",
                    (pixels_before,),
                )
        self._db().execute("PRAGMA incremental_vacuum")

    def counts(self) -> dict[str, int]:
        db = self._db()
        return {
            "answers": db.execute("SELECT count(*) FROM answers").fetchone()[0],
            "feedback": db.execute("SELECT count(*) FROM feedback").fetchone()[0],
        }

    def close(self) -> None:
        with self._guard:
            for db in self._connections:
                try:
                    db.close()
                except sqlite3.ProgrammingError:  # made on another thread: closed with it
                    pass
            self._connections.clear()
        self._local = threading.local()


def parse_feedback(data: bytes, class_names: tuple[str, ...]) -> tuple[str, str]:
    """A POST /feedback body -> (request id, label); BadRequest (400) naming what is wrong."""
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise BadRequest(
            'expected a JSON object {"request_id": "...", "label": "cat"}', 400, "bad_json"
        )
    rid, label = body.get("request_id"), body.get("label")
    if not isinstance(rid, str) or not ANSWER_ID.fullmatch(rid):
        raise BadRequest(
            f"request_id {rid!r} is not a request id this service gives out "
            "(the `request_id` of a /classify answer, or of one image of a batch)",
            400,
            "bad_request_id",
        )
    if not isinstance(label, str) or label not in class_names:
        raise BadRequest(
            f"label {label!r} is not a CIFAR-10 class; expected one of {', '.join(class_names)}",
            400,
            "bad_label",
        )
    return rid, label
