"""The output database of ``peregrine batch`` (any SQLAlchemy URL; SQLite by default).

Three tables, named after ``--table`` (default ``predictions``):

* ``<table>``: one row per input row: ``run_id``, ``row_id`` (the input's id, as text),
  ``model``, ``model_version``, then the outputs. An output of one element per row is one
  column named as the output; up to ``WIDE_LIMIT`` elements, one column per element
  (``probabilities_0`` .. ``probabilities_9``); more, or a variable shape, one column of text
  holding the row's values as a JSON array. Primary key (run_id, row_id).
* ``<table>_runs``: one row per scored file: its SHA-256, path, model, version, chunk size,
  row count, start and finish times. A file, model and version scored once is a run: scoring
  the same again resumes that run (or does nothing when it finished).
* ``<table>_chunks``: (run_id, chunk) of every chunk written. A chunk's predictions and its
  mark are written in one transaction, so after a kill a chunk is either all there and
  marked, or absent; a rerun scores exactly the chunks not marked.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import sqlalchemy as sa  # the batch extra: `peregrine batch` says so when it is missing

from server.spec import ModelSpec, TensorSpec
from server.types import Array, DataType

#: Outputs with at most this many elements per row get a column per element.
WIDE_LIMIT = 64


class SinkError(RuntimeError):
    """The database refused something (connect, create, write): the reason, in one line."""


@dataclass(frozen=True, slots=True)
class OutputColumns:
    """How one model output becomes columns."""

    name: str
    datatype: DataType
    #: Column names: [name] for one element, name_i per element, or [name] holding JSON.
    columns: tuple[str, ...]
    as_json: bool


def output_columns(spec: ModelSpec) -> list[OutputColumns]:
    layout = []
    for tensor in spec.outputs:
        elements = _elements(tensor)
        if elements == 1:
            layout.append(OutputColumns(tensor.name, tensor.datatype, (tensor.name,), False))
        elif elements is not None and elements <= WIDE_LIMIT:
            layout.append(OutputColumns(tensor.name, tensor.datatype, tuple(
                f"{tensor.name}_{i}" for i in range(elements)), False))
        else:
            layout.append(OutputColumns(tensor.name, tensor.datatype, (tensor.name,), True))
    return layout


def _elements(tensor: TensorSpec) -> int | None:
    return None if any(d < 0 for d in tensor.dims) else math.prod(tensor.dims)


def _sql_type(datatype: DataType) -> Any:
    if datatype is DataType.BOOL:
        return sa.Boolean()
    if datatype in (DataType.FP16, DataType.FP32, DataType.FP64):
        return sa.Float(precision=53).with_variant(sa.Double(), "postgresql")
    if datatype is DataType.BYTES:
        return sa.Text()
    return sa.BigInteger()


@dataclass(frozen=True, slots=True)
class Run:
    run_id: int
    chunk_rows: int
    done: frozenset[int]
    finished: bool


class Sink:
    """One output database. ``write_chunk`` is called from one writer thread at a time."""

    def __init__(self, url: str, table: str, spec: ModelSpec) -> None:
        try:
            self.engine = sa.create_engine(url)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as exc:
            raise SinkError(f"output {url!r}: {_reason(exc)}") from None
        self.layout = output_columns(spec)
        self.model = spec.name
        meta = sa.MetaData()
        outputs = [sa.Column(column, sa.Text() if out.as_json else _sql_type(out.datatype))
                   for out in self.layout for column in out.columns]
        self.predictions = sa.Table(
            table, meta,
            sa.Column("run_id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("row_id", sa.String(255), primary_key=True),
            sa.Column("model", sa.String(255), nullable=False),
            sa.Column("model_version", sa.String(64), nullable=False),
            *outputs)
        self.runs = sa.Table(
            f"{table}_runs", meta,
            sa.Column("run_id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("digest", sa.String(64), nullable=False),
            sa.Column("source", sa.Text, nullable=False),
            sa.Column("model", sa.String(255), nullable=False),
            sa.Column("model_version", sa.String(64), nullable=False),
            sa.Column("chunk_rows", sa.Integer, nullable=False),
            sa.Column("rows", sa.Integer, nullable=False),
            sa.Column("started_at", sa.DateTime, nullable=False),
            sa.Column("finished_at", sa.DateTime, nullable=True),
            sa.UniqueConstraint("digest", "model", "model_version"))
        self.chunks = sa.Table(
            f"{table}_chunks", meta,
            sa.Column("run_id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("chunk", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("rows", sa.Integer, nullable=False))
        self._meta = meta
        dialect = self.engine.dialect
        compiled = self.predictions.insert().compile(dialect=dialect)
        self._insert_sql = str(compiled)
        self._positional = bool(compiled.positional)
        #: The predictions columns in the order the INSERT (or COPY) takes them.
        self._order: tuple[str, ...] = (tuple(compiled.positiontup or ()) if self._positional
                                        else tuple(c.name for c in self.predictions.columns))
        self._copy: str | None = None
        if dialect.name == "postgresql" and dialect.driver == "psycopg":
            quote = dialect.identifier_preparer
            self._copy = (f"COPY {quote.format_table(self.predictions)} "
                          f"({', '.join(quote.quote(c) for c in self._order)}) FROM STDIN")
        #: What the driver raises when used directly (COPY, executemany).
        self._driver_error: type[Exception] = dialect.loaded_dbapi.Error
        if dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_wal)

    def create(self) -> None:
        """Create the tables that do not exist yet; an existing predictions table must have
        this model's output columns."""
        try:
            self._meta.create_all(self.engine)
            existing = {c["name"] for c in sa.inspect(self.engine).get_columns(
                self.predictions.name)}
        except sa.exc.SQLAlchemyError as exc:
            raise SinkError(f"cannot create the output tables: {_reason(exc)}") from None
        missing = [c.name for c in self.predictions.columns if c.name not in existing]
        if missing:
            raise SinkError(f"table '{self.predictions.name}' exists without the columns "
                            f"{missing} this model writes: use another --table")

    def find_run(self, digest: str, version: str) -> Run | None:
        runs, chunks = self.runs, self.chunks
        try:
            with self.engine.connect() as conn:
                row = conn.execute(sa.select(runs.c.run_id, runs.c.chunk_rows,
                                             runs.c.finished_at).where(
                    runs.c.digest == digest, runs.c.model == self.model,
                    runs.c.model_version == version)).first()
                if row is None:
                    return None
                done = conn.execute(sa.select(chunks.c.chunk).where(
                    chunks.c.run_id == row.run_id)).scalars().all()
        except sa.exc.SQLAlchemyError as exc:
            raise SinkError(f"cannot read the runs table: {_reason(exc)}") from None
        return Run(row.run_id, row.chunk_rows, frozenset(done), row.finished_at is not None)

    def start_run(self, digest: str, source: str, version: str, chunk_rows: int,
                  rows: int) -> Run:
        try:
            with self.engine.begin() as conn:
                result = conn.execute(self.runs.insert().values(
                    digest=digest, source=source, model=self.model, model_version=version,
                    chunk_rows=chunk_rows, rows=rows, started_at=_now()))
                key = result.inserted_primary_key
                assert key is not None
                run_id = int(key[0])
        except sa.exc.SQLAlchemyError as exc:
            raise SinkError(f"cannot record the run: {_reason(exc)}") from None
        return Run(run_id, chunk_rows, frozenset(), False)

    def write_chunk(self, run_id: int, chunk: int, version: str, ids: Sequence[str],
                    outputs: dict[str, Array]) -> None:
        """The chunk's predictions and its mark, in one transaction."""
        rows = len(ids)
        columns: dict[str, Iterable[Any]] = {
            "run_id": repeat(run_id, rows), "row_id": ids, "model": repeat(self.model, rows),
            "model_version": repeat(version, rows)}
        for out in self.layout:
            flat = outputs[out.name].reshape(rows, -1)
            if out.as_json:
                columns[out.name] = [json.dumps(_plain(row, out.datatype)) for row in flat]
            else:
                # Column by column, each converted in one call: no per-value numpy work.
                for index, column in enumerate(out.columns):
                    columns[column] = _plain(flat[:, index], out.datatype)
        values = list(zip(*(columns[name] for name in self._order), strict=False))
        try:
            with self.engine.begin() as conn:
                self._insert(conn, values)
                conn.execute(self.chunks.insert().values(run_id=run_id, chunk=chunk,
                                                         rows=rows))
        except (sa.exc.SQLAlchemyError, self._driver_error) as exc:
            raise SinkError(f"the database refused chunk {chunk} (rows "
                            f"{ids[0]}..{ids[-1]}): {_reason(exc)}") from None

    def _insert(self, conn: sa.Connection, values: list[tuple[Any, ...]]) -> None:
        """Rows (tuples in ``_order``) into the predictions table, in ``conn``'s transaction,
        the driver's cheapest way: COPY on PostgreSQL through psycopg, else the driver's own
        executemany of one prepared INSERT (no per-row SQLAlchemy processing: the values are
        already the Python types the driver takes)."""
        if self._copy is not None:
            driver = conn.connection.driver_connection
            assert driver is not None
            with driver.cursor() as cursor, cursor.copy(self._copy) as copy:
                for row in values:
                    copy.write_row(row)
        elif self._positional:
            conn.exec_driver_sql(self._insert_sql, values)
        else:
            conn.exec_driver_sql(self._insert_sql,
                                 [dict(zip(self._order, row, strict=True)) for row in values])

    def finish_run(self, run_id: int) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(self.runs.update().where(self.runs.c.run_id == run_id)
                             .values(finished_at=_now()))
        except sa.exc.SQLAlchemyError as exc:
            raise SinkError(f"cannot mark run {run_id} finished: {_reason(exc)}") from None

    def close(self) -> None:
        self.engine.dispose()


def _plain(values: Array, datatype: DataType) -> list[Any]:
    """numpy values as the Python values a driver takes (BYTES as text)."""
    if datatype is DataType.BYTES:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                for v in values.tolist()]
    return list(values.tolist())


def _sqlite_wal(dbapi_connection: Any, _record: Any) -> None:
    """Write-ahead logging with synchronous=NORMAL: a commit appends the chunk's pages to the
    log without a sync (the log is synced at checkpoints), instead of syncing a rollback
    journal and the database file per commit. Each chunk stays one atomic transaction: an
    application crash or kill loses nothing committed, and a power cut can at most lose the
    last chunks whole (their rows with their marks), which a rerun scores again."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def _reason(exc: BaseException) -> str:
    """The driver's own words, without SQLAlchemy's statement dump and links."""
    original = getattr(exc, "orig", None)
    text = str(original if original is not None else exc).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(exc).__name__
