"""A persistent, content-addressed cache of CNN codes, shared across processes.

Grid searches fit a fresh copy of the feature transformer for every fold
and candidate, so without a cache the expensive forward pass runs again and
again on the same images. :class:`FeatureCache` stores one row of codes per
image in an SQLite database inside a directory; ``CNNFeatureTransformer(
memory=directory)`` looks every image up first and runs the network on the
missing ones only.

What a row is keyed by
----------------------
* the **image's content** (:func:`~sklearn_transfer.identity.content_key`):
  the SHA-256 of the file's bytes (or of the array's dtype, shape and
  bytes), never only its path, so
  an edited file is recomputed and a copied one is found;
* the **computation**: the :attr:`~sklearn_transfer.CodesComputation.key`
  of the transformer's ``computation_``, fixed at ``fit``: a SHA-256 over the
  network's architecture and every weight and buffer, the versions of the
  packages defining its layers, the stages, pooling, ReLU, the preprocessing,
  the numeric precision and
  :data:`~sklearn_transfer.computation.CODES_VERSION`. Versions of torch or
  Pillow are not part of the key: they change codes by rounding at most;
  :meth:`FeatureCache.clear` starts afresh if wanted. Forward hooks, patched
  ``forward`` methods and a network edited in place after ``fit`` are what
  the key cannot see: refit after editing (or pass the edited module as
  ``backbone=``), and do not use a cache with hooks.

Codes read from the cache equal freshly computed ones bit for bit when the
images were batched alike; on a CPU, other batch compositions can differ in
the last bit of float32 (as two uncached runs with other batch sizes do).

Safety
------
SQLite in write-ahead-log mode gives atomic, isolated transactions: several
processes (``GridSearchCV(n_jobs=2)``, two scripts) read while one writes,
writers queue behind a busy timeout, and a process killed mid-write leaves
an uncommitted transaction that SQLite rolls back on the next open. Each row
also carries its length and a BLAKE2b checksum of key and codes, checked on
every read; a row failing them (a damaged disk, a file copied while being
written) is ignored, recomputed and overwritten. Do not put the directory on
a network file system (NFS, SMB): SQLite's locking is unreliable there.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sqlite3
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sklearn_transfer.files import FORMATS, check_format, format_tag
from sklearn_transfer.identity import content_key, image_keys
from sklearn_transfer.images import ImageSource, as_image_source

if TYPE_CHECKING:
    from sklearn_transfer.computation import CodesComputation

__all__ = [
    "CacheDamagedError",
    "CacheInfo",
    "FeatureCache",
    "as_feature_cache",
]

DB_NAME = "sklearn_transfer_codes.sqlite3"
# Writers hold the lock for one batch's insert (milliseconds); waiting this long
# means something is badly wrong, e.g. a process stopped while holding the lock.
BUSY_TIMEOUT_S = 120.0
_CHUNK = 500  # keys per SELECT ... IN (...), well below SQLite's variable limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS computations (
    config      TEXT PRIMARY KEY,  -- SHA-256 of the description below
    description TEXT NOT NULL,     -- JSON: backbone, weights, stages, pooling, ...
    n_features  INTEGER NOT NULL,
    created     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS codes (
    config     TEXT NOT NULL,      -- computations.config
    image      BLOB NOT NULL,      -- SHA-256 of the image's content (32 bytes)
    n_features INTEGER NOT NULL,
    checksum   BLOB NOT NULL,      -- BLAKE2b-128 of image key, width and data
    data       BLOB NOT NULL,      -- float32 little-endian codes
    PRIMARY KEY (config, image)
);
"""


class CacheDamagedError(ValueError):
    """The feature cache's database file is damaged; the message says how to start afresh."""


def _damaged(exc: sqlite3.Error) -> bool:
    """Is this SQLite's word for a file it cannot read as a database?"""
    return "malformed" in str(exc) or "not a database" in str(exc)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: committed if the block ends normally, else rolled back.

    IMMEDIATE takes the write lock up front, so two writers queue on the busy
    timeout instead of one failing when it upgrades a read lock.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back already (a full disk): nothing left to undo
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _checksum(image: bytes, n_features: int, data: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(image)
    h.update(n_features.to_bytes(8, "little"))
    h.update(data)
    return h.digest()


def _unchanged(source: ImageSource, index: int, key: bytes) -> bool:
    """Does image ``index`` still have content key ``key``? (A vanished file has not.)

    Only files can change behind the caller's back; in-memory images pass.
    """
    if not isinstance(source.item(index), (str, os.PathLike)):
        return True
    try:
        return content_key(source, index) == key
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class CacheInfo:
    """What a :class:`FeatureCache` holds.

    Attributes
    ----------
    path : str
        The database file.
    entries : int
        Rows of codes (one per image and computation).
    nbytes : int
        Bytes of codes stored.
    disk_bytes : int
        Size of the database files on disk (including SQLite's log and free pages).
    computations : list of dict
        One per way of computing codes: backbone, stages, pooling, ... with
        its ``entries`` and ``nbytes``.
    """

    path: str
    entries: int
    nbytes: int
    disk_bytes: int
    computations: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.entries} entries, {self.nbytes / 1e6:.1f} MB of codes, "
                 f"{self.disk_bytes / 1e6:.1f} MB on disk"]
        for c in self.computations:
            lines.append(
                f"  {c['backbone']} stages={c['stage_names']} pooling={c['pooling']} "
                f"relu={c['relu']} {c['precision']} on {c['engine']}: {c['entries']} entries"
            )
        return "\n".join(lines)


class FeatureCache:
    """CNN codes stored per image in an SQLite database under ``directory``.

    Usually created for you by ``CNNFeatureTransformer(memory=directory)``;
    use it directly to see what a cache holds or to clear it. Nothing is
    opened or created until first use, and instances pickle as their path,
    so they travel to joblib workers.

    Parameters
    ----------
    directory : path-like
        Created if missing. Must be writable (SQLite's write-ahead log lives
        next to the database), and on a local file system.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from sklearn_transfer import FeatureCache
    >>> cache = FeatureCache(tempfile.mkdtemp())
    >>> cache.store("demo", [b"k" * 32], np.ones((1, 4), dtype=np.float32))
    >>> found = cache.lookup("demo", [b"k" * 32, b"x" * 32], n_features=4)
    >>> sorted(found) == [0], found[0].tolist()
    (True, [1.0, 1.0, 1.0, 1.0])
    >>> cache.info().entries
    1
    >>> cache.clear()
    1
    >>> cache.info().entries
    0
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        if isinstance(directory, FeatureCache):
            directory = directory.directory
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(
                f"a feature cache directory is a path (str or pathlib.Path), got "
                f"{type(directory).__name__}"
            )
        if not os.fspath(directory):  # "" would silently mean the current directory
            raise ValueError("the feature cache directory is an empty path; name a directory, "
                             "or pass memory=None to run without a cache")
        self.directory = os.fspath(directory)

    def __repr__(self) -> str:
        return f"FeatureCache({self.directory!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FeatureCache) and other.directory == self.directory

    def __hash__(self) -> int:
        return hash(self.directory)

    @property
    def path(self) -> Path:
        """The database file."""
        return Path(self.directory).expanduser() / DB_NAME

    # ---------------------------------------------------------------- opening

    def check_writable(self) -> None:
        """Create the directory and database if needed; raise if they cannot be written.

        Raises
        ------
        PermissionError
            The directory (or the database in it) cannot be written; the
            message names it.
        NotADirectoryError
            The path exists and is not a directory.
        """
        directory = self._make_directory()
        # os.access is wrong for root and for some mounts; actually writing is not
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise self._not_writable(exc) from None
        with self._connect():
            pass

    def _make_directory(self) -> Path:
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            pass  # reported below
        except OSError as exc:
            raise self._not_writable(exc) from None
        if not directory.is_dir():
            raise NotADirectoryError(
                f"feature cache directory {str(directory)!r} exists and is not a directory"
            )
        return directory

    def _not_writable(self, exc: BaseException) -> PermissionError:
        reason = getattr(exc, "strerror", None) or str(exc)
        return PermissionError(
            f"the feature cache directory {str(self.path.parent)!r} is not writable ({reason}). "
            "The cache needs a directory it can create files in (SQLite keeps a log next to "
            "the database); pass another directory as memory=..., or memory=None to run "
            "without a cache."
        )

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One connection: WAL mode, busy timeout, schema checked; closed on exit.

        A database file that SQLite cannot read (overwritten, not a database)
        is set aside and a fresh one created (see :meth:`_set_aside`).
        """
        self._make_directory()
        for attempt in range(2):
            try:
                # isolation_level=None: no implicit transactions, ours are explicit
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            except sqlite3.Error as exc:
                raise self._not_writable(exc) from None
            try:
                self._prepare(conn)
                break
            except sqlite3.DatabaseError as exc:
                conn.close()
                if _damaged(exc) and attempt == 0:
                    self._set_aside(exc)
                    continue
                raise self._explained(exc) from None
        try:
            yield conn
        except sqlite3.DatabaseError as exc:
            raise self._explained(exc) from None
        finally:
            conn.close()

    def _explained(self, exc: sqlite3.Error) -> Exception:
        """An SQLite error as one that names the cache and what to do; others unchanged."""
        text = str(exc)
        if "readonly" in text or "unable to open" in text:
            return self._not_writable(exc)
        if "full" in text:
            return OSError(errno.ENOSPC, f"the disk holding the feature cache directory "
                           f"{str(self.path.parent)!r} is full ({text}); free space, or pass "
                           "another directory as memory=..., or memory=None")
        if _damaged(exc):
            return CacheDamagedError(f"the feature cache {str(self.path)!r} is damaged ({text}); "
                                     f"FeatureCache({self.directory!r}).clear() sets it aside "
                                     "and starts afresh")
        return exc

    def _set_aside(self, exc: BaseException) -> None:
        """Move a damaged database (and its log) out of the way, warning where it went."""
        target = f"{self.path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns()}"
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}{suffix}", f"{target}{suffix}")
        warnings.warn(
            f"the feature cache {str(self.path)!r} is damaged ({exc}); it was moved to "
            f"{target!r} and a fresh cache is used (delete the old file once you no longer "
            "need it)",
            RuntimeWarning,
            stacklevel=4,
        )

    def _prepare(self, conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            # switching needs a moment alone with the file; the busy timeout does not
            # always apply to it, so retry a few times when a new cache is opened by
            # several processes at once
            for attempt in range(50):
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or attempt == 49:
                        raise
                    time.sleep(0.1)
        # in WAL mode NORMAL loses no committed data on a process crash, only
        # possibly the last transactions on a power cut, and never corrupts the file
        conn.execute("PRAGMA synchronous = NORMAL")
        # the format's version is SQLite's user_version: 0 is a database just created
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            with _transaction(conn):
                if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                    # one by one: executescript would commit the open transaction
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {FORMATS['feature-cache']}")
            return
        check_format("feature-cache", format_tag("feature-cache", version), self.path,
                     "use another directory, or delete this one")

    # ----------------------------------------------------------- rows of codes

    def lookup(
        self,
        config: str,
        keys: Sequence[bytes],
        n_features: int,
        conn: sqlite3.Connection | None = None,
    ) -> dict[int, np.ndarray]:
        """The stored codes of those ``keys`` that have valid rows.

        Parameters
        ----------
        config : str
            The computation's key (:attr:`~sklearn_transfer.CodesComputation.key`).
        keys : sequence of bytes
            Image keys (see :func:`~sklearn_transfer.identity.image_keys`).
        n_features : int
            The expected width; rows of another width are ignored.
        conn : sqlite3.Connection, optional
            An open connection (internal); by default one is opened.

        Returns
        -------
        dict of int to ndarray
            Position in ``keys`` -> float32 codes of shape ``(n_features,)``.
            Rows failing their length or checksum test are left out (and
            reported in a ``RuntimeWarning``) so the caller recomputes them.
        """
        if conn is None:
            with self._connect() as conn:
                return self.lookup(config, keys, n_features, conn)
        where: dict[bytes, list[int]] = {}
        for i, key in enumerate(keys):
            where.setdefault(bytes(key), []).append(i)
        unique = list(where)
        found: dict[int, np.ndarray] = {}
        bad = 0
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start: start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT image, n_features, checksum, data FROM codes "
                f"WHERE config = ? AND image IN ({marks})",
                [config, *chunk],
            ).fetchall()
            for image, width, checksum, data in rows:
                if (width != n_features or len(data) != 4 * n_features
                        or checksum != _checksum(image, width, data)):
                    bad += 1
                    continue
                codes = np.frombuffer(data, dtype="<f4")
                for i in where[bytes(image)]:
                    found[i] = codes
        if bad:
            warnings.warn(
                f"{bad} entries of the feature cache {str(self.path)!r} failed their integrity "
                "check (damaged or incomplete); they are ignored and recomputed",
                RuntimeWarning,
                stacklevel=2,
            )
        return found

    def store(
        self,
        config: str,
        keys: Sequence[bytes],
        codes: np.ndarray,
        description: dict | None = None,
        conn: sqlite3.Connection | None = None,
    ) -> None:
        """Store one row of ``codes`` per key, in one transaction.

        Parameters
        ----------
        config : str
            The computation's key.
        keys : sequence of bytes
            Image keys, one per row of ``codes``.
        codes : ndarray of shape (len(keys), n_features)
        description : dict, optional
            What ``config`` means (shown by :meth:`info`).
        conn : sqlite3.Connection, optional
            An open connection (internal); by default one is opened.
        """
        codes = np.asarray(codes, dtype="<f4")
        if codes.ndim != 2 or len(codes) != len(keys):
            raise ValueError(
                f"codes of shape {codes.shape} do not match {len(keys)} keys; expected "
                "(n_keys, n_features)"
            )
        if conn is None:
            with self._connect() as conn:
                return self.store(config, keys, codes, description, conn)
        n_features = int(codes.shape[1])
        rows = []
        for key, row in zip(keys, codes, strict=True):
            key = bytes(key)
            data = np.ascontiguousarray(row).tobytes()
            rows.append((config, key, n_features, _checksum(key, n_features, data), data))
        with _transaction(conn):
            conn.execute(
                "INSERT OR IGNORE INTO computations VALUES (?, ?, ?, ?)",
                (config, json.dumps(description or {}, sort_keys=True), n_features, time.time()),
            )
            self._insert(conn, rows)

    @staticmethod
    def _insert(conn: sqlite3.Connection, rows: list[tuple]) -> None:
        # REPLACE: a row that failed its checksum is overwritten by the recomputed one;
        # two processes writing the same image write the same codes
        conn.executemany("INSERT OR REPLACE INTO codes VALUES (?, ?, ?, ?, ?)", rows)

    # -------------------------------------------------- around a computation

    def codes(
        self,
        computation: CodesComputation,
        images: Any,
        compute: Callable[[np.ndarray, Callable[[np.ndarray, np.ndarray], None]], np.ndarray],
    ) -> np.ndarray:
        """The codes of every image under ``computation``: read where stored, else computed.

        Parameters
        ----------
        computation : CodesComputation
            Its ``key`` and ``n_features`` name and size the rows.
        images : ImageSource or images
            Each is looked up by its
            :func:`~sklearn_transfer.identity.content_key`; identical
            images are computed once.
        compute : callable
            ``compute(indices, on_batch)`` returns the codes of
            ``images[indices]`` and calls ``on_batch(positions, codes)``
            after each batch (``positions`` into ``indices``), which stores
            that batch in its own transaction: a run stopped half-way keeps
            what it computed.

        Returns
        -------
        ndarray of float32, shape (n_images, computation.n_features)

        Notes
        -----
        An image whose file changed between its look-up and its decoding is
        returned as decoded but not stored (its key named the old content).
        Should storing fail (a full disk), the codes are still returned, with
        one ``RuntimeWarning``.
        """
        source = as_image_source(images)
        keys = image_keys(source)
        first: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        unique = np.fromiter(first.values(), dtype=np.int64, count=len(first))
        width = computation.n_features
        out = np.empty((len(source), width), dtype=np.float32)
        found: dict[int, np.ndarray] = {}
        try:
            with self._connect() as conn:
                found = self.lookup(computation.key, [keys[i] for i in unique], width, conn=conn)
        except CacheDamagedError as exc:  # damaged beyond its first page
            self._set_aside(exc)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            warnings.warn(f"{exc}; computing the codes without storing them", RuntimeWarning,
                          stacklevel=3)
            return compute(np.arange(len(source)), None)
        for pos, row in found.items():
            out[unique[pos]] = row
        missing = np.asarray([i for pos, i in enumerate(unique) if pos not in found],
                             dtype=np.int64)
        if len(missing):
            with self._connect() as conn:
                failed: list[Exception] = []

                def store(positions: np.ndarray, codes: np.ndarray) -> None:
                    if failed:
                        return
                    batch = missing[positions]
                    same = [j for j, i in enumerate(batch) if _unchanged(source, int(i), keys[i])]
                    if not same:
                        return
                    try:
                        self.store(computation.key, [keys[batch[j]] for j in same],
                                   codes[same], computation.describe(), conn=conn)
                    except sqlite3.Error as exc:
                        # a full disk must not throw away the codes computed so far
                        failed.append(exc)
                        warnings.warn(
                            f"{self._explained(exc)}; going on without storing codes",
                            RuntimeWarning,
                            stacklevel=3,
                        )

                out[missing] = compute(missing, store)
        if len(unique) < len(keys):
            out[:] = out[[first[key] for key in keys]]
        return out

    # ------------------------------------------------------------ housekeeping

    def info(self) -> CacheInfo:
        """How many entries and bytes the cache holds, per computation.

        Returns
        -------
        CacheInfo
        """
        if not self.path.exists():  # looking does not create anything
            return CacheInfo(path=str(self.path), entries=0, nbytes=0, disk_bytes=0)
        with self._connect() as conn:
            per = conn.execute(
                "SELECT config, COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM codes "
                "GROUP BY config"
            ).fetchall()
            described = dict(conn.execute("SELECT config, description FROM computations"))
        computations = []
        for config, entries, nbytes in per:
            desc = json.loads(described.get(config) or "{}")
            computations.append({
                "config": config,
                "backbone": desc.get("backbone", "?"),
                "stage_names": desc.get("stage_names", "?"),
                "pooling": desc.get("pooling", "?"),
                "relu": desc.get("relu", "?"),
                "precision": desc.get("precision", "?"),
                "engine": desc.get("engine", "?"),
                "description": desc,
                "entries": int(entries),
                "nbytes": int(nbytes),
            })
        disk = sum(
            p.stat().st_size
            for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm"))
            if p.exists()
        )
        return CacheInfo(
            path=str(self.path),
            entries=sum(c["entries"] for c in computations),
            nbytes=sum(c["nbytes"] for c in computations),
            disk_bytes=disk,
            computations=computations,
        )

    def clear(self) -> int:
        """Delete every entry and give the space back to the file system.

        Safe while other processes use the cache: they wait for the lock and
        then find no entries (and recompute). A damaged database file is set
        aside (renamed, with a warning naming it) instead.

        Returns
        -------
        int
            The number of entries deleted (0 for a damaged file set aside).
        """
        if not self.path.exists():
            return 0
        try:
            with self._connect() as conn:
                with _transaction(conn):
                    n = conn.execute("SELECT COUNT(*) FROM codes").fetchone()[0]
                    conn.execute("DELETE FROM codes")
                    conn.execute("DELETE FROM computations")
                # shrinking is best effort: VACUUM cannot run while another process reads
                with contextlib.suppress(sqlite3.OperationalError):
                    conn.execute("VACUUM")
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except CacheDamagedError as exc:
            self._set_aside(exc)
            return 0
        return int(n)


def as_feature_cache(memory: Any) -> FeatureCache | None:
    """``memory`` parameter -> :class:`FeatureCache` (or ``None``), with a clear error."""
    if memory is None or isinstance(memory, FeatureCache):
        return memory
    if isinstance(memory, (str, os.PathLike)):
        return FeatureCache(memory)
    raise TypeError(
        f"memory={memory!r} must be None, a directory path (str or pathlib.Path) or a "
        "sklearn_transfer.FeatureCache"
    )
