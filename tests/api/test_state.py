"""The SQLite state store: records round-trip, writes are durable at once, transactions, migrations, errors."""

import os
import shutil
import sqlite3
import tempfile

import pytest

from hyperd.errors import Conflict, NotFound
from hyperd.state import MIGRATIONS, SCHEMA_VERSION, StateError, StateStore


@pytest.fixture
def db_path():
    d = tempfile.mkdtemp(prefix="hd", dir="/tmp")
    try:
        yield os.path.join(d, "state.db")
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def store(db_path):
    s = StateStore(db_path, clock=iter(range(1000, 100000)).__next__)
    try:
        yield s
    finally:
        s.close()


def test_records_round_trip_and_survive_reopening(db_path, store):
    store.put_vm("vm-1", None, "idle", {"pid": 42, "cpu": 1})
    store.put_pod("pod-1", "web", {"id": "web", "containers": []}, "pending")
    store.put_container("c1", "pod-1", "web-busybox-0", "busybox", "pending", record={"tty": False})
    store.put_image("sha256:aa", "busybox:latest", "sha256:bb", {"size": 1})
    store.allocate("ip", "192.168.123.2", "pod-1")
    # a second connection sees everything at once: each write was committed before returning
    other = StateStore(db_path)
    try:
        assert other.get_vm("vm-1").record == {"pid": 42, "cpu": 1}
        pod = other.get_pod("pod-1")
        assert (pod.name, pod.status, pod.spec, pod.vm_id, pod.reason) == (
            "web", "pending", {"id": "web", "containers": []}, None, "")
        assert other.get_container("c1").record == {"tty": False}
        assert other.find_container("web-busybox-0").container_id == "c1"
        assert [i.name for i in other.images()] == ["busybox:latest"]
        assert other.allocations("ip") == {("ip", "192.168.123.2"): "pod-1"}
    finally:
        other.close()


def test_put_replaces_but_keeps_created(store):
    store.put_vm("vm-1", None, "booting")
    created = store.get_vm("vm-1").created
    store.put_vm("vm-1", "pod-1", "associated")
    vm = store.get_vm("vm-1")
    assert (vm.pod_id, vm.status, vm.created) == ("pod-1", "associated", created)


def test_update_changes_fields_and_misses_are_not_found(store):
    store.put_pod("pod-1", "web", {}, "pending")
    store.update_pod("pod-1", status="running", vm_id="vm-1", started=5.0, spec={"id": "web"})
    pod = store.get_pod("pod-1")
    assert (pod.status, pod.vm_id, pod.started, pod.spec) == ("running", "vm-1", 5.0, {"id": "web"})
    with pytest.raises(NotFound):
        store.update_pod("pod-2", status="running")
    with pytest.raises(NotFound):
        store.update_vm("vm-9", status="idle")
    with pytest.raises(NotFound):
        store.update_container("c9", status="running")


def test_duplicate_names_are_conflicts(store):
    store.put_pod("pod-1", "web", {}, "pending")
    with pytest.raises(Conflict):
        store.put_pod("pod-2", "web", {}, "pending")
    store.put_container("c1", "pod-1", "db", "busybox", "pending")
    with pytest.raises(Conflict):
        store.put_container("c2", "pod-1", "db", "busybox", "pending")
    assert store.get_pod("pod-2") is None and store.get_container("c2") is None


def test_allocations_are_exclusive_and_released_by_owner(store):
    store.allocate("ip", "10.0.0.2", "pod-1")
    store.allocate("ip", "10.0.0.2", "pod-1")  # again by the owner: fine
    store.allocate("tap", "tap0", "pod-1")
    with pytest.raises(Conflict):
        store.allocate("ip", "10.0.0.2", "pod-2")
    assert store.release_owner("pod-1") == 2
    assert store.allocations() == {}


def test_transaction_commits_together_or_not_at_all(db_path, store):
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.put_pod("pod-1", "web", {}, "pending")
            store.put_container("c1", "pod-1", "web-0", "busybox", "pending")
            raise RuntimeError("boom")
    assert store.pods() == [] and store.containers() == []
    with store.transaction():
        store.put_pod("pod-1", "web", {}, "pending")
        with store.transaction():  # nested: joins the outer one
            store.put_container("c1", "pod-1", "web-0", "busybox", "pending")
        other = StateStore(db_path)
        try:
            assert other.pods() == []  # not visible before the outer block ends
        finally:
            other.close()
    assert [c.name for c in store.containers("pod-1")] == ["web-0"]


def test_a_conflict_inside_a_transaction_rolls_it_back(store):
    store.put_pod("pod-1", "web", {}, "pending")
    with pytest.raises(Conflict):
        with store.transaction():
            store.put_pod("pod-2", "db", {}, "pending")
            store.put_pod("pod-3", "web", {}, "pending")
    assert [p.pod_id for p in store.pods()] == ["pod-1"]


def test_delete_pod_deletes_its_containers(store):
    store.put_pod("pod-1", "web", {}, "pending")
    store.put_container("c1", "pod-1", "web-0", "busybox", "pending")
    store.put_container("c2", "pod-2", "other-0", "busybox", "pending")
    assert store.delete_pod("pod-1") is True
    assert store.delete_pod("pod-1") is False
    assert [c.container_id for c in store.containers()] == ["c2"]


def test_wal_mode_and_schema_version(db_path, store):
    assert store.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()
    assert oct(os.stat(db_path).st_mode & 0o777) == "0o600"


def test_not_a_database_is_an_error_and_the_file_is_kept(db_path):
    with open(db_path, "wb") as f:
        f.write(b"garbage" * 1000)
    with pytest.raises(StateError) as e:
        StateStore(db_path)
    assert db_path in str(e.value) and "move it aside" in str(e.value)
    with open(db_path, "rb") as f:
        assert f.read(7) == b"garbage"


def test_a_damaged_database_is_an_error(db_path, store):
    for i in range(200):
        store.put_pod(f"pod-{i}", f"name-{i}", {"pad": "x" * 500}, "pending")
    store.close()
    assert not os.path.exists(db_path + "-wal") or os.path.getsize(db_path + "-wal") == 0
    size = os.path.getsize(db_path)
    with open(db_path, "r+b") as f:  # scribble over the middle pages, keep the header
        f.seek(size // 2)
        f.write(b"\xff" * 8192)
    with pytest.raises(StateError) as e:
        StateStore(db_path)
    assert "corrupt" in str(e.value) or "cannot be used" in str(e.value)


def test_a_newer_schema_is_refused(db_path, store):
    store.close()
    raw = sqlite3.connect(db_path)
    raw.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    with pytest.raises(StateError) as e:
        StateStore(db_path)
    assert "newer than this hyperd understands" in str(e.value)


def test_a_directory_in_place_of_the_database_is_an_error(db_path):
    os.mkdir(db_path)
    with pytest.raises(StateError) as e:
        StateStore(db_path)
    assert db_path in str(e.value)
