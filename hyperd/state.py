"""What must survive a daemon restart: VMs, pods, containers, images and allocations, in SQLite.

One file (``<root>/state.db``), stdlib ``sqlite3`` in WAL mode with ``synchronous=FULL``: every write is
committed (and on disk) before the method returns, so a change the daemon acknowledged is never lost. Several
rows that must change together go in one :meth:`StateStore.transaction`.

The schema has a version (``PRAGMA user_version``) and migrations in code (:data:`MIGRATIONS`). A database
we cannot read, that is corrupt, or that a newer hyperd wrote is a :class:`StateError` at start-up: we never
replace it silently, because it is the only record of the user's pods.

Calls are synchronous and quick (one small indexed statement each). They run on the reactor thread; if
profiling ever shows them slow, they move behind a one-thread pool without changing this API.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import attrs
from zope.interface import implementer

from hyperd.errors import Conflict, NotFound
from hyperd.interfaces import IStateStore

__all__ = [
    "StateStore",
    "StateError",
    "VMRecord",
    "PodRecord",
    "ContainerRecord",
    "ImageRecord",
    "SCHEMA_VERSION",
    "MIGRATIONS",
]


class StateError(Exception):
    """The state database cannot be used; the message says which file and why."""


#: MIGRATIONS[n] brings a database from version n to n + 1. Append, never edit a shipped entry.
MIGRATIONS: list[str] = [
    # 0 -> 1: the first schema
    """
    CREATE TABLE vms (
        vm_id    TEXT PRIMARY KEY,
        pod_id   TEXT,
        status   TEXT NOT NULL,
        record   TEXT NOT NULL DEFAULT '{}',
        created  REAL NOT NULL
    );
    CREATE TABLE pods (
        pod_id   TEXT PRIMARY KEY,
        name     TEXT NOT NULL UNIQUE,
        spec     TEXT NOT NULL,
        status   TEXT NOT NULL,
        vm_id    TEXT,
        reason   TEXT NOT NULL DEFAULT '',
        created  REAL NOT NULL,
        started  REAL,
        finished REAL
    );
    CREATE TABLE containers (
        container_id TEXT PRIMARY KEY,
        pod_id       TEXT NOT NULL,
        name         TEXT NOT NULL UNIQUE,
        image        TEXT NOT NULL,
        status       TEXT NOT NULL,
        exit_code    INTEGER,
        record       TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX containers_by_pod ON containers (pod_id);
    CREATE TABLE images (
        image_id TEXT PRIMARY KEY,
        name     TEXT,
        digest   TEXT,
        record   TEXT NOT NULL DEFAULT '{}',
        created  REAL NOT NULL
    );
    CREATE INDEX images_by_name ON images (name);
    CREATE TABLE allocations (
        kind  TEXT NOT NULL,
        key   TEXT NOT NULL,
        owner TEXT NOT NULL,
        PRIMARY KEY (kind, key)
    );
    """,
    # 1 -> 2: execs outlive a daemon restart
    """
    CREATE TABLE execs (
        exec_id      TEXT PRIMARY KEY,
        pod_id       TEXT NOT NULL,
        container_id TEXT NOT NULL,
        status       TEXT NOT NULL,
        exit_code    INTEGER,
        record       TEXT NOT NULL DEFAULT '{}',
        created      REAL NOT NULL
    );
    CREATE INDEX execs_by_pod ON execs (pod_id);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


@attrs.frozen
class VMRecord:
    vm_id: str
    pod_id: str | None
    status: str
    record: dict
    created: float


@attrs.frozen
class PodRecord:
    pod_id: str
    name: str
    spec: dict
    status: str
    vm_id: str | None
    reason: str
    created: float
    started: float | None
    finished: float | None


@attrs.frozen
class ContainerRecord:
    container_id: str
    pod_id: str
    name: str
    image: str
    status: str
    exit_code: int | None
    record: dict


@attrs.frozen
class ExecRow:
    exec_id: str
    pod_id: str
    container_id: str
    status: str
    exit_code: int | None
    record: dict
    created: float


@attrs.frozen
class ImageRecord:
    image_id: str
    name: str | None
    digest: str | None
    record: dict
    created: float


def _dumps(value: Any) -> str:
    return json.dumps(value if value is not None else {}, sort_keys=True, separators=(",", ":"))


@implementer(IStateStore)
class StateStore:
    """The SQLite state of one daemon. Open with ``StateStore(path)``; ``close()`` when done."""

    def __init__(self, path: str, clock=time.time) -> None:
        self.path = path
        self._clock = clock
        self._depth = 0
        self._db = self._open(path)

    # --- opening and migrating -------------------------------------------------------------------

    def _open(self, path: str) -> sqlite3.Connection:
        directory = os.path.dirname(path) or "."
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as e:
            raise StateError(f"state database {path}: cannot create {directory}: {e.strerror}") from None
        if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
            raise StateError(f"state database {path}: not readable and writable by this user")
        db = None
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves (see transaction()).
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
            db.row_factory = sqlite3.Row
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StateError(f"state database {path}: cannot switch to WAL mode (got {mode})")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StateError(f"state database {path} is corrupt ({check}); "
                                 "move it aside to start with an empty state")
            self._migrate(db, path)
        except sqlite3.DatabaseError as e:
            if db is not None:
                db.close()
            raise StateError(f"state database {path} cannot be used: {e}; "
                             "move it aside to start with an empty state") from None
        except StateError:
            if db is not None:
                db.close()
            raise
        os.chmod(path, 0o600)
        return db

    @staticmethod
    def _migrate(db: sqlite3.Connection, path: str) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(f"state database {path} has schema version {version}, newer than this "
                             f"hyperd understands ({SCHEMA_VERSION}); upgrade hyperd")
        for v in range(version, SCHEMA_VERSION):
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[v].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={v + 1}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # --- transactions ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[StateStore]:
        """Group writes: all of them are committed together when the outermost block ends, or none.

        Nested blocks join the outer one. Writes outside any block commit on their own.
        """
        if self._depth == 0:
            self._db.execute("BEGIN IMMEDIATE")
        self._depth += 1
        try:
            yield self
        except BaseException:
            self._depth -= 1
            if self._depth == 0:
                self._db.execute("ROLLBACK")
            raise
        else:
            self._depth -= 1
            if self._depth == 0:
                self._db.execute("COMMIT")

    def _write(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self.transaction():
            try:
                return self._db.execute(sql, args)
            except sqlite3.IntegrityError as e:
                raise Conflict(f"conflict: {e}") from None

    def _rows(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        return self._db.execute(sql, args).fetchall()

    def _update(self, table: str, key: str, value: str, fields: dict[str, Any], json_fields=()) -> None:
        if not fields:
            return
        cols = []
        args = []
        for name, v in fields.items():
            cols.append(f"{name}=?")
            args.append(_dumps(v) if name in json_fields else v)
        cur = self._write(f"UPDATE {table} SET {', '.join(cols)} WHERE {key}=?", (*args, value))
        if cur.rowcount == 0:
            raise NotFound(f"no such {table[:-1]}: {value}")

    # --- VMs ----------------------------------------------------------------------------------------

    def put_vm(self, vm_id: str, pod_id: str | None, status: str, record: dict | None = None) -> None:
        """Insert or replace a VM (its ``created`` time is kept on replace)."""
        self._write(
            "INSERT INTO vms (vm_id, pod_id, status, record, created) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (vm_id) DO UPDATE SET pod_id=excluded.pod_id, status=excluded.status, "
            "record=excluded.record",
            (vm_id, pod_id, status, _dumps(record), self._clock()),
        )

    def update_vm(self, vm_id: str, **fields: Any) -> None:
        """Change some of pod_id, status, record; NotFound if there is no such VM."""
        self._update("vms", "vm_id", vm_id, fields, json_fields=("record",))

    def get_vm(self, vm_id: str) -> VMRecord | None:
        rows = self._rows("SELECT * FROM vms WHERE vm_id=?", (vm_id,))
        return self._vm(rows[0]) if rows else None

    def delete_vm(self, vm_id: str) -> bool:
        return self._write("DELETE FROM vms WHERE vm_id=?", (vm_id,)).rowcount > 0

    def vms(self) -> list[VMRecord]:
        return [self._vm(r) for r in self._rows("SELECT * FROM vms ORDER BY created, vm_id")]

    @staticmethod
    def _vm(r: sqlite3.Row) -> VMRecord:
        return VMRecord(r["vm_id"], r["pod_id"], r["status"], json.loads(r["record"]), r["created"])

    # --- pods ---------------------------------------------------------------------------------------

    def put_pod(
        self,
        pod_id: str,
        name: str,
        spec: dict,
        status: str,
        vm_id: str | None = None,
        reason: str = "",
        started: float | None = None,
        finished: float | None = None,
    ) -> None:
        """Insert or replace a pod; a name another pod has is a Conflict."""
        self._write(
            "INSERT INTO pods (pod_id, name, spec, status, vm_id, reason, created, started, finished) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (pod_id) DO UPDATE SET name=excluded.name, "
            "spec=excluded.spec, status=excluded.status, vm_id=excluded.vm_id, reason=excluded.reason, "
            "started=excluded.started, finished=excluded.finished",
            (pod_id, name, _dumps(spec), status, vm_id, reason, self._clock(), started, finished),
        )

    def update_pod(self, pod_id: str, **fields: Any) -> None:
        """Change some of name, spec, status, vm_id, reason, started, finished; NotFound if absent."""
        self._update("pods", "pod_id", pod_id, fields, json_fields=("spec",))

    def get_pod(self, pod_id: str) -> PodRecord | None:
        rows = self._rows("SELECT * FROM pods WHERE pod_id=?", (pod_id,))
        return self._pod(rows[0]) if rows else None

    def get_pod_by_name(self, name: str) -> PodRecord | None:
        rows = self._rows("SELECT * FROM pods WHERE name=?", (name,))
        return self._pod(rows[0]) if rows else None

    def delete_pod(self, pod_id: str) -> bool:
        """Delete a pod, its containers and their execs, together."""
        with self.transaction():
            self._write("DELETE FROM execs WHERE pod_id=?", (pod_id,))
            self._write("DELETE FROM containers WHERE pod_id=?", (pod_id,))
            return self._write("DELETE FROM pods WHERE pod_id=?", (pod_id,)).rowcount > 0

    def pods(self) -> list[PodRecord]:
        return [self._pod(r) for r in self._rows("SELECT * FROM pods ORDER BY created, pod_id")]

    @staticmethod
    def _pod(r: sqlite3.Row) -> PodRecord:
        return PodRecord(
            r["pod_id"], r["name"], json.loads(r["spec"]), r["status"], r["vm_id"], r["reason"],
            r["created"], r["started"], r["finished"],
        )

    # --- containers ---------------------------------------------------------------------------------

    def put_container(
        self,
        container_id: str,
        pod_id: str,
        name: str,
        image: str,
        status: str,
        exit_code: int | None = None,
        record: dict | None = None,
    ) -> None:
        """Insert or replace a container; a name another container has is a Conflict."""
        self._write(
            "INSERT INTO containers (container_id, pod_id, name, image, status, exit_code, record) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (container_id) DO UPDATE SET pod_id=excluded.pod_id, "
            "name=excluded.name, image=excluded.image, status=excluded.status, "
            "exit_code=excluded.exit_code, record=excluded.record",
            (container_id, pod_id, name, image, status, exit_code, _dumps(record)),
        )

    def update_container(self, container_id: str, **fields: Any) -> None:
        """Change some of pod_id, name, image, status, exit_code, record; NotFound if absent."""
        self._update("containers", "container_id", container_id, fields, json_fields=("record",))

    def get_container(self, container_id: str) -> ContainerRecord | None:
        rows = self._rows("SELECT * FROM containers WHERE container_id=?", (container_id,))
        return self._container(rows[0]) if rows else None

    def find_container(self, id_or_name: str) -> ContainerRecord | None:
        """A container by id or by name."""
        rows = self._rows("SELECT * FROM containers WHERE container_id=? OR name=? ORDER BY "
                          "container_id=? DESC LIMIT 1", (id_or_name, id_or_name, id_or_name))
        return self._container(rows[0]) if rows else None

    def delete_container(self, container_id: str) -> bool:
        return self._write("DELETE FROM containers WHERE container_id=?", (container_id,)).rowcount > 0

    def containers(self, pod_id: str | None = None) -> list[ContainerRecord]:
        if pod_id is None:
            rows = self._rows("SELECT * FROM containers ORDER BY pod_id, rowid")
        else:
            rows = self._rows("SELECT * FROM containers WHERE pod_id=? ORDER BY rowid", (pod_id,))
        return [self._container(r) for r in rows]

    @staticmethod
    def _container(r: sqlite3.Row) -> ContainerRecord:
        return ContainerRecord(
            r["container_id"], r["pod_id"], r["name"], r["image"], r["status"], r["exit_code"],
            json.loads(r["record"]),
        )

    # --- execs ----------------------------------------------------------------------------------------

    def put_exec(self, exec_id: str, pod_id: str, container_id: str, status: str, exit_code: int | None = None,
                 record: dict | None = None, created: float | None = None) -> None:
        """Insert or replace an exec (a process started in a running container, or in its VM)."""
        self._write(
            "INSERT INTO execs (exec_id, pod_id, container_id, status, exit_code, record, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (exec_id) DO UPDATE SET status=excluded.status, "
            "exit_code=excluded.exit_code, record=excluded.record",
            (exec_id, pod_id, container_id, status, exit_code, _dumps(record),
             created if created is not None else self._clock()),
        )

    def execs(self, pod_id: str | None = None) -> list[ExecRow]:
        if pod_id is None:
            rows = self._rows("SELECT * FROM execs ORDER BY created, exec_id")
        else:
            rows = self._rows("SELECT * FROM execs WHERE pod_id=? ORDER BY created, exec_id", (pod_id,))
        return [ExecRow(r["exec_id"], r["pod_id"], r["container_id"], r["status"], r["exit_code"],
                        json.loads(r["record"]), r["created"]) for r in rows]

    def delete_exec(self, exec_id: str) -> bool:
        return self._write("DELETE FROM execs WHERE exec_id=?", (exec_id,)).rowcount > 0

    # --- images ---------------------------------------------------------------------------------------

    def put_image(self, image_id: str, name: str | None, digest: str | None, record: dict | None = None) -> None:
        self._write(
            "INSERT INTO images (image_id, name, digest, record, created) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (image_id) DO UPDATE SET name=excluded.name, digest=excluded.digest, "
            "record=excluded.record",
            (image_id, name, digest, _dumps(record), self._clock()),
        )

    def get_image(self, image_id: str) -> ImageRecord | None:
        rows = self._rows("SELECT * FROM images WHERE image_id=?", (image_id,))
        return self._image(rows[0]) if rows else None

    def delete_image(self, image_id: str) -> bool:
        return self._write("DELETE FROM images WHERE image_id=?", (image_id,)).rowcount > 0

    def images(self) -> list[ImageRecord]:
        return [self._image(r) for r in self._rows("SELECT * FROM images ORDER BY created, image_id")]

    @staticmethod
    def _image(r: sqlite3.Row) -> ImageRecord:
        return ImageRecord(r["image_id"], r["name"], r["digest"], json.loads(r["record"]), r["created"])

    # --- allocations (IPs, tap names, CIDs, ports: anything handed out that must not be handed twice) ---

    def allocate(self, kind: str, key: str, owner: str) -> None:
        """Record that ``owner`` holds ``key`` of ``kind``; Conflict if someone else holds it."""
        with self.transaction():
            rows = self._rows("SELECT owner FROM allocations WHERE kind=? AND key=?", (kind, key))
            if rows:
                if rows[0]["owner"] == owner:
                    return
                raise Conflict(f"conflict: {kind} {key} is already held by {rows[0]['owner']}")
            self._write("INSERT INTO allocations (kind, key, owner) VALUES (?, ?, ?)", (kind, key, owner))

    def release(self, kind: str, key: str) -> bool:
        return self._write("DELETE FROM allocations WHERE kind=? AND key=?", (kind, key)).rowcount > 0

    def release_owner(self, owner: str) -> int:
        """Release everything ``owner`` holds; returns how many."""
        return self._write("DELETE FROM allocations WHERE owner=?", (owner,)).rowcount

    def allocations(self, kind: str | None = None) -> dict[tuple[str, str], str]:
        """{(kind, key): owner}, for one kind or all."""
        if kind is None:
            rows = self._rows("SELECT * FROM allocations ORDER BY kind, key")
        else:
            rows = self._rows("SELECT * FROM allocations WHERE kind=? ORDER BY key", (kind,))
        return {(r["kind"], r["key"]): r["owner"] for r in rows}
