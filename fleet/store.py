"""The fleet store: devices, last state, telemetry history, events, commands, config versions.

SQLite by default (one file), PostgreSQL at scale (`postgresql://...`): the same schema and the
same SQL (written with `?` placeholders; PostgreSQL's driver gets `%s`). JSON documents are
stored as text so both behave alike.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS devices (
        id TEXT PRIMARY KEY, grp TEXT NOT NULL DEFAULT '', state TEXT NOT NULL DEFAULT 'unknown',
        state_seq BIGINT NOT NULL DEFAULT 0, state_ts DOUBLE PRECISION, last_seen DOUBLE
        PRECISION, software TEXT, last_telemetry TEXT, config_version INTEGER NOT NULL DEFAULT 0,
        config_status TEXT, config_error TEXT, last_seq BIGINT NOT NULL DEFAULT 0,
        incarnation TEXT)""",
    """CREATE TABLE IF NOT EXISTS telemetry (device TEXT NOT NULL, seq BIGINT NOT NULL,
        ts DOUBLE PRECISION, received DOUBLE PRECISION, payload TEXT NOT NULL,
        PRIMARY KEY (device, seq))""",
    """CREATE TABLE IF NOT EXISTS events (device TEXT NOT NULL, seq BIGINT NOT NULL,
        ts DOUBLE PRECISION, received DOUBLE PRECISION, kind TEXT, payload TEXT NOT NULL,
        PRIMARY KEY (device, seq))""",
    """CREATE TABLE IF NOT EXISTS commands (corr TEXT PRIMARY KEY, device TEXT NOT NULL,
        name TEXT NOT NULL, args TEXT, sent DOUBLE PRECISION, ok INTEGER, reply TEXT,
        replied DOUBLE PRECISION)""",
    """CREATE TABLE IF NOT EXISTS config_versions (device TEXT NOT NULL, version INTEGER NOT NULL,
        vals TEXT NOT NULL, created DOUBLE PRECISION, status TEXT, error TEXT,
        PRIMARY KEY (device, version))""",
    "CREATE INDEX IF NOT EXISTS telemetry_recent ON telemetry (device, received)",
]


class StoreError(RuntimeError):
    """The store cannot be opened or used; the message says which and why."""


def _as_text(payload: bytes | None, doc: dict) -> str:
    """The payload as received when it is UTF-8 JSON text, else the document re-encoded."""
    if payload is not None:
        try:
            return payload.decode()
        except UnicodeDecodeError:
            pass
    return json.dumps(doc)


def _ensure_device(cur, device: str) -> None:
    cur.execute("INSERT INTO devices (id) VALUES (?) ON CONFLICT (id) DO NOTHING", (device,))


class FleetStore:
    """One connection to SQLite or PostgreSQL, safe to share between threads (a lock)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.lock = threading.Lock()
        if url.startswith(("postgresql://", "postgres://")):
            try:
                import psycopg
            except ImportError:
                raise StoreError("PostgreSQL store needs psycopg: pip install "
                                 "'echoel-box[postgres]'") from None
            try:
                self.conn = psycopg.connect(url, autocommit=False)
            except psycopg.Error as exc:
                raise StoreError(f"cannot open the fleet store {url}: {exc}") from None
            self.pg = True
        else:
            path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            try:
                self.conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open the fleet store {path}: {exc}") from None
            self.pg = False
        with self.tx() as cur:
            for stmt in SCHEMA:
                cur.execute(stmt)
        self._migrate()
        # devices known to have a row: a batch inserts only the new ones (rows are never
        # deleted; another service sharing the database inserts with ON CONFLICT as well)
        with self.tx() as cur:
            self._known = {r[0] for r in cur.execute("SELECT id FROM devices").fetchall()}

    def _migrate(self) -> None:
        """Bring a store made by an older version up to this schema."""
        for col, decl in (("last_seq", "BIGINT NOT NULL DEFAULT 0"), ("incarnation", "TEXT")):
            try:
                with self.tx() as cur:
                    cur.execute(f"SELECT {col} FROM devices LIMIT 0")
            except Exception:
                with self.tx() as cur:
                    cur.execute(f"ALTER TABLE devices ADD COLUMN {col} {decl}")

    def _sql(self, q: str) -> str:
        return q.replace("?", "%s") if self.pg else q

    class _Tx:
        def __init__(self, store: FleetStore) -> None:
            self.store = store

        def __enter__(self):
            self.store.lock.acquire()
            self.cur = self.store.conn.cursor()
            return self

        def execute(self, q: str, params: Iterable = ()) -> Any:
            self.cur.execute(self.store._sql(q), tuple(params))
            return self.cur

        def executemany(self, q: str, rows: list) -> None:
            if rows:
                self.cur.executemany(self.store._sql(q), rows)

        def __exit__(self, et, ev, tb):
            try:
                if et is None:
                    self.store.conn.commit()
                else:
                    self.store.conn.rollback()
            finally:
                self.cur.close()
                self.store.lock.release()

    def tx(self) -> FleetStore._Tx:
        """A transaction: `with store.tx() as cur: cur.execute(...)`."""
        return FleetStore._Tx(self)

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    # ------------------------------------------------------------------ ingest
    def ingest(self, batch: list[tuple]) -> None:
        """Store a batch of (device, leaf, document[, payload as received]) in one
        transaction; the payload's text is stored as it came when given."""
        now = time.time()
        tele, events, replies = [], [], []
        new = sorted({row[0] for row in batch} - self._known)
        with self.tx() as cur:
            cur.executemany("INSERT INTO devices (id) VALUES (?) ON CONFLICT (id) DO NOTHING",
                            [(d,) for d in new])
            for device, leaf, doc, *raw in batch:
                text = _as_text(raw[0] if raw else None, doc)
                if leaf == "telemetry":
                    tele.append((device, int(doc.get("seq", 0)), doc.get("ts"), now, text))
                elif leaf == "events":
                    events.append((device, int(doc.get("seq", 0)), doc.get("ts"), now,
                                   str(doc.get("kind", "")), text))
                elif leaf == "state":
                    self._state(cur, device, doc, now)
                elif leaf == "config/reported":
                    cur.execute("UPDATE devices SET config_version = ?, config_status = ?, "
                                "config_error = ?, last_seen = ? WHERE id = ?",
                                (int(doc.get("version", 0)), doc.get("status"),
                                 doc.get("error"), now, device))
                    v = doc.get("desired_version", doc.get("version"))
                    cur.execute("UPDATE config_versions SET status = ?, error = ? WHERE "
                                "device = ? AND version = ?",
                                (doc.get("status"), doc.get("error"), device, v))
                elif leaf.startswith("reply/") and doc.get("corr"):
                    replies.append((1 if doc.get("ok") else 0, json.dumps(doc), now,
                                    doc["corr"]))
            cur.executemany("INSERT INTO telemetry VALUES (?, ?, ?, ?, ?) "
                            "ON CONFLICT (device, seq) DO NOTHING", tele)
            cur.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?) "
                            "ON CONFLICT (device, seq) DO NOTHING", events)
            cur.executemany("UPDATE commands SET ok = ?, reply = ?, replied = ? WHERE corr = ?",
                            replies)
            last: dict[str, tuple] = {}
            for row in tele:
                if row[0] not in last or row[1] > last[row[0]][1]:
                    last[row[0]] = row
            # workers store batches in parallel: an older batch never replaces newer telemetry
            # (rows in device order: parallel writers lock them in the same order)
            cur.executemany("UPDATE devices SET last_seen = ?, last_telemetry = ?, last_seq = ? "
                            "WHERE id = ? AND last_seq < ?",
                            [(now, r[4], r[1], r[0], r[1]) for r in sorted(last.values())])
            seen = {row[0] for row in batch if row[1] == "events"} - set(last)
            cur.executemany("UPDATE devices SET last_seen = ? WHERE id = ?",
                            [(now, d) for d in seen])
        self._known.update(new)  # committed

    @staticmethod
    def _state(cur, device: str, doc: dict, now: float) -> None:
        """Birth/death: a message from an older connection (lower seq) never wins. A box that
        was reflashed (a new incarnation: its counters start again) is taken as new."""
        seq = int(doc.get("seq", 0))
        state = str(doc.get("state", "unknown"))
        inc = doc.get("incarnation")
        row = cur.execute("SELECT state_seq, incarnation FROM devices WHERE id = ?",
                          (device,)).fetchone()
        if row and inc and row[1] and inc != row[1]:
            cur.execute("UPDATE devices SET state_seq = 0, last_seq = 0 WHERE id = ?", (device,))
        elif row and seq < int(row[0]):
            return
        if inc:
            cur.execute("UPDATE devices SET incarnation = ? WHERE id = ?", (inc, device))
        cur.execute("UPDATE devices SET state = ?, state_seq = ?, state_ts = ?, last_seen = ?, "
                    "software = COALESCE(?, software), grp = CASE WHEN grp = '' THEN "
                    "COALESCE(?, '') ELSE grp END WHERE id = ?",
                    (state, seq, doc.get("ts"), now, doc.get("software"),
                     doc.get("group") or "", device))

    # ------------------------------------------------------------------ operator side
    def devices(self, group: str | None = None) -> list[dict]:
        """Every device (or a group's), with its state and last telemetry."""
        q = "SELECT id, grp, state, state_seq, last_seen, software, last_telemetry, " \
            "config_version, config_status, config_error FROM devices"
        params: tuple = ()
        if group:
            q += " WHERE grp = ?"
            params = (group,)
        with self.tx() as cur:
            rows = cur.execute(q + " ORDER BY id", params).fetchall()
        keys = ("id", "group", "state", "state_seq", "last_seen", "software", "telemetry",
                "config_version", "config_status", "config_error")
        out = []
        for r in rows:
            d = dict(zip(keys, r, strict=True))
            d["telemetry"] = json.loads(d["telemetry"]) if d["telemetry"] else None
            out.append(d)
        return out

    def device(self, device: str) -> dict | None:
        """One device, or None."""
        return next((d for d in self.devices() if d["id"] == device), None)

    def recent(self, device: str, table: str, n: int = 10) -> list[dict]:
        """The device's newest telemetry or events (newest first)."""
        if table not in ("telemetry", "events"):
            raise ValueError(table)
        with self.tx() as cur:
            rows = cur.execute(f"SELECT payload FROM {table} WHERE device = ? "
                               "ORDER BY seq DESC LIMIT ?", (device, n)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def count(self, table: str, device: str | None = None) -> int:
        """Rows in telemetry/events (of a device)."""
        if table not in ("telemetry", "events", "devices", "commands"):
            raise ValueError(table)
        q, p = f"SELECT count(*) FROM {table}", ()
        if device:
            q, p = q + " WHERE " + ("id" if table == "devices" else "device") + " = ?", (device,)
        with self.tx() as cur:
            return int(cur.execute(q, p).fetchone()[0])

    def seqs(self, device: str, table: str = "telemetry") -> list[int]:
        """The stored sequence numbers of a device, in order."""
        if table not in ("telemetry", "events"):
            raise ValueError(table)
        with self.tx() as cur:
            rows = cur.execute(f"SELECT seq FROM {table} WHERE device = ? ORDER BY seq",
                               (device,)).fetchall()
        return [int(r[0]) for r in rows]

    def set_group(self, device: str, group: str) -> None:
        """Put a device in a group."""
        with self.tx() as cur:
            _ensure_device(cur, device)
            cur.execute("UPDATE devices SET grp = ? WHERE id = ?", (group, device))

    def desired(self, device: str) -> tuple[int, dict]:
        """The newest desired config (version, values) recorded for a device."""
        with self.tx() as cur:
            row = cur.execute("SELECT version, vals FROM config_versions WHERE device = ? "
                              "ORDER BY version DESC LIMIT 1", (device,)).fetchone()
        return (int(row[0]), json.loads(row[1])) if row else (0, {})

    def add_desired(self, device: str, changes: dict, removals: Iterable[str] = ()) -> \
            tuple[int, dict]:
        """Record the next desired config: the previous values with `changes` on top."""
        with self.tx() as cur:
            _ensure_device(cur, device)
            row = cur.execute("SELECT version, vals FROM config_versions WHERE device = ? "
                              "ORDER BY version DESC LIMIT 1", (device,)).fetchone()
            version, values = (int(row[0]), json.loads(row[1])) if row else (0, {})
            values = {k: v for k, v in {**values, **changes}.items() if k not in set(removals)}
            version += 1
            cur.execute("INSERT INTO config_versions VALUES (?, ?, ?, ?, 'sent', NULL)",
                        (device, version, json.dumps(values, sort_keys=True), time.time()))
        return version, values

    def log_command(self, corr: str, device: str, name: str, args: dict) -> None:
        """Record a command as sent."""
        with self.tx() as cur:
            _ensure_device(cur, device)
            cur.execute("INSERT INTO commands (corr, device, name, args, sent) VALUES "
                        "(?, ?, ?, ?, ?)", (corr, device, name, json.dumps(args), time.time()))

    def command(self, corr: str) -> dict | None:
        """A logged command and its reply, if any."""
        with self.tx() as cur:
            r = cur.execute("SELECT device, name, args, ok, reply FROM commands WHERE corr = ?",
                            (corr,)).fetchone()
        if not r:
            return None
        return {"device": r[0], "name": r[1], "args": json.loads(r[2] or "{}"),
                "ok": None if r[3] is None else bool(r[3]),
                "reply": json.loads(r[4]) if r[4] else None}
