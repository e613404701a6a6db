"""peregrine batch: scoring files through the server's data plane into SQLite and PostgreSQL,
resuming after a kill, bad input files, a database that refuses writes, the watch folder."""

from __future__ import annotations

import asyncio
import csv
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from server.app import open_offline
from server.batch import cron
from server.batch.runner import Options
from server.batch.sink import Sink, SinkError
from server.batch.watch import run_schedule
from server.batch.writer import ChunkWriter
from server.cli.main import main
from server.types import DataType, InferRequest
from tests import model_factory
from tests.postgres import postgres_url

ROOT = Path(__file__).resolve().parents[3]
ROWS = 300


@pytest.fixture(scope="module")
def mlp(examples_repo: Path) -> Path:
    return examples_repo


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    return np.random.default_rng(7).random((ROWS, 64), dtype=np.float32)


def expected(repo: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(repo / "mlp_classifier" / "2" / "model.onnx"))
    label, probabilities = session.run(["label", "probabilities"], {"input": x})
    return {"label": np.asarray(label).reshape(-1), "probabilities": probabilities}


def read_predictions(url: str, table: str = "predictions") -> list[sa.Row[tuple[object, ...]]]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = list(conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY run_id, row_id")))
    engine.dispose()
    return rows


def check_scores(url: str, repo: Path, x: np.ndarray, ids: list[str]) -> None:
    rows = read_predictions(url)
    by_id = {row.row_id: row for row in rows}
    assert len(rows) == len(by_id) == len(ids)
    want = expected(repo, x)
    got_label = np.array([by_id[i].label for i in ids])
    got_prob = np.array([[getattr(by_id[i], f"probabilities_{k}") for k in range(10)]
                         for i in ids])
    assert {row.model_version for row in rows} == {"2"}
    np.testing.assert_array_equal(got_label, want["label"])
    np.testing.assert_allclose(got_prob, want["probabilities"], rtol=1e-6, atol=1e-7)


def write_parquet(path: Path, x: np.ndarray, ids: list[str]) -> None:
    columns = {"id": pa.array(ids), **{f"f{i}": pa.array(x[:, i]) for i in range(64)}}
    pq.write_table(pa.table(columns), path)


def write_csv(path: Path, x: np.ndarray) -> None:
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow([f"f{i}" for i in range(64)])
        writer.writerows([[repr(float(v)) for v in row] for row in x])


def test_parquet_csv_npz_into_sqlite(mlp: Path, features: np.ndarray, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    ids = [f"user-{i}" for i in range(ROWS)]
    write_parquet(tmp_path / "rows.parquet", features, ids)
    write_csv(tmp_path / "rows.csv", features)
    np.savez(tmp_path / "rows.npz", input=features, id=np.arange(1000, 1000 + ROWS))
    cases = [("rows.parquet", ids), ("rows.csv", [str(i) for i in range(ROWS)]),
             ("rows.npz", [str(i) for i in range(1000, 1000 + ROWS)])]
    for name, want_ids in cases:
        url = f"sqlite:///{tmp_path / (name + '.db')}"
        code = main(["batch", "--model", "mlp_classifier", "--repository", str(mlp),
                     "--input", str(tmp_path / name), "--output", url, "--batch-size", "32",
                     "--chunk-rows", "64", "--no-progress"])
        assert code == 0, capsys.readouterr().err
        assert "rows/s" in capsys.readouterr().out
        x = np.asarray([[float(v) for v in row] for row in features.tolist()], np.float32) \
            if name.endswith(".csv") else features
        check_scores(url, mlp, x, want_ids)
    # The same file again: already scored, nothing written twice.
    assert main(["batch", "--model", "mlp_classifier", "--repository", str(mlp), "--input",
                 str(tmp_path / "rows.npz"), "--output", f"sqlite:///{tmp_path / 'rows.npz.db'}",
                 "--no-progress"]) == 0
    assert "already scored" in capsys.readouterr().out
    assert len(read_predictions(f"sqlite:///{tmp_path / 'rows.npz.db'}")) == ROWS


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    try:
        with postgres_url() as url:
            yield url
    except RuntimeError as exc:
        pytest.skip(f"no local PostgreSQL server: {exc}")


def test_scores_into_postgresql(mlp: Path, features: np.ndarray, tmp_path: Path,
                                postgres: str) -> None:
    np.savez(tmp_path / "rows.npz", input=features)
    assert main(["batch", "--model", "mlp_classifier", "--repository", str(mlp), "--input",
                 str(tmp_path / "rows.npz"), "--output", postgres, "--chunk-rows", "100",
                 "--no-progress"]) == 0
    check_scores(postgres, mlp, features, [str(i) for i in range(ROWS)])


def test_a_role_without_insert_stops_the_run_with_the_reason(
        mlp: Path, features: np.ndarray, tmp_path: Path, postgres: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """PostgreSQL refuses the inserts (a role without INSERT on the predictions table): the run
    stops naming the reason and the chunk."""
    admin = sa.create_engine(postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text("CREATE ROLE reader LOGIN"))
        conn.execute(sa.text("CREATE SCHEMA scoring AUTHORIZATION postgres"))
        conn.execute(sa.text("GRANT USAGE ON SCHEMA scoring TO reader"))
    np.savez(tmp_path / "rows.npz", input=features)
    url = postgres.replace("postgres@", "reader@", 1)
    sink = Sink(postgres + "?options=-csearch_path%3Dscoring", "refused", _spec_of(mlp))
    sink.create()  # made by another role: the reader may record runs, not predictions
    sink.close()
    with admin.connect() as conn:
        conn.execute(sa.text("GRANT SELECT ON ALL TABLES IN SCHEMA scoring TO reader"))
        conn.execute(sa.text("GRANT INSERT, UPDATE ON scoring.refused_runs, "
                             "scoring.refused_chunks TO reader"))
        conn.execute(sa.text("GRANT USAGE ON ALL SEQUENCES IN SCHEMA scoring TO reader"))
    code = main(["batch", "--model", "mlp_classifier", "--repository", str(mlp), "--input",
                 str(tmp_path / "rows.npz"), "--output",
                 url + "?options=-csearch_path%3Dscoring", "--table", "refused",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert "refused chunk 0" in err and "permission denied for table refused" in err, err
    assert "Traceback" not in err
    with admin.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM scoring.refused")).scalar() == 0
    admin.dispose()


def _spec_of(repo: Path) -> object:
    async def spec() -> object:
        model = await open_offline(repo, "mlp_classifier", "2")
        await model.close()
        return model.spec

    return asyncio.run(spec())


def test_a_database_that_refuses_writes_stops_and_keeps_finished_chunks(
        mlp: Path, features: np.ndarray, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """SQLite refuses the inserts past 100 rows (a trigger, as a quota would): the run stops
    with the database's reason, the two chunks written stay; once the database takes writes
    again a rerun completes them without duplicates."""
    np.savez(tmp_path / "rows.npz", input=features)
    db = tmp_path / "out.db"
    url = f"sqlite:///{db}"
    sink = Sink(url, "predictions", _spec_of(mlp))
    sink.create()
    sink.close()
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TRIGGER quota BEFORE INSERT ON predictions WHEN (SELECT count(*) "
                     "FROM predictions) >= 100 BEGIN SELECT RAISE(ABORT, 'quota reached'); END")
    args = ["batch", "--model", "mlp_classifier", "--repository", str(mlp), "--input",
            str(tmp_path / "rows.npz"), "--output", url, "--batch-size", "25",
            "--chunk-rows", "50", "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "refused chunk 2 (rows 100..149): quota reached" in err, err
    assert "Traceback" not in err
    assert len(read_predictions(url)) == 100
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TRIGGER quota")
    assert main(args) == 0
    check_scores(url, mlp, features, [str(i) for i in range(ROWS)])


def test_resumes_after_a_kill_without_duplicates_or_gaps(tmp_path: Path) -> None:
    """kill -9 in the middle, then the same command again: every row once."""
    repo = tmp_path / "repo"
    model_factory.slow_model(repo, "slow", delay_ms=30.0, max_batch_size=8)
    rows = 160
    x = np.random.default_rng(3).random((rows, model_factory.SLOW_WIDTH), dtype=np.float32)
    np.savez(tmp_path / "rows.npz", INPUT0=x)
    db = tmp_path / "out.db"
    command = [sys.executable, "-m", "server.cli", "batch", "--model", "slow", "--repository",
               str(repo), "--input", str(tmp_path / "rows.npz"), "--output",
               f"sqlite:///{db}", "--batch-size", "8", "--chunk-rows", "8", "--no-progress"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    done = 0
    deadline = time.monotonic() + 60
    while done < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
        if db.exists():
            try:
                with sqlite3.connect(db) as conn:
                    done = conn.execute("SELECT count(*) FROM predictions_chunks").fetchone()[0]
            except sqlite3.OperationalError:
                pass  # the tables are not there yet
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert done >= 3
    with sqlite3.connect(db) as conn:
        partial = conn.execute("SELECT count(*) FROM predictions").fetchone()[0]
    assert 0 < partial < rows
    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert f"scored {rows - partial} rows" in resumed.stdout
    with sqlite3.connect(db) as conn:
        ids = [int(r[0]) for r in conn.execute("SELECT row_id FROM predictions")]
        outputs = dict(conn.execute("SELECT row_id, OUTPUT0 FROM predictions").fetchall())
    assert sorted(ids) == list(range(rows))
    want = model_factory.slow_model_expected(x, 30.0)
    for row in (0, rows // 2, rows - 1):
        np.testing.assert_array_equal(np.asarray(eval(outputs[str(row)]), np.float32), want[row])


def test_two_instances_score_through_the_data_plane(tmp_path: Path) -> None:
    """One instance: the chunks go to the version's executor directly (run_rows); two:
    requests go through the data plane's queue to keep both busy. Both write every row."""
    repo = tmp_path / "repo"
    model_factory.identity_model(repo, "one", "FP32", max_batch_size=8)
    model_factory.identity_model(repo, "two", "FP32", max_batch_size=8, instance_count=2)
    x = np.random.default_rng(5).random((50, 3), dtype=np.float32)
    np.savez(tmp_path / "rows.npz", INPUT0=x)

    async def runs_direct(name: str) -> bool:
        model = await open_offline(repo, name)
        direct = model.runs_direct
        await model.close()
        return direct

    assert asyncio.run(runs_direct("one")) and not asyncio.run(runs_direct("two"))
    for name in ("one", "two"):
        url = f"sqlite:///{tmp_path / name}.db"
        assert main(["batch", "--model", name, "--repository", str(repo), "--input",
                     str(tmp_path / "rows.npz"), "--output", url, "--batch-size", "8",
                     "--chunk-rows", "20", "--no-progress"]) == 0
        got = {row.row_id: row.OUTPUT0 for row in read_predictions(url)}
        assert sorted(got, key=int) == [str(i) for i in range(50)]
        np.testing.assert_array_equal(np.array([eval(got[str(i)]) for i in range(50)],
                                               np.float32), x)


def test_direct_scoring_preprocesses_as_the_data_plane(mlp: Path) -> None:
    """The image model's declared preprocessing runs on the direct path: every row's scores
    equal the answers of the same rows submitted as requests through the data plane."""
    images = np.random.default_rng(11).integers(0, 256, (20, 40, 40, 3), dtype=np.uint8)

    async def both() -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
        model = await open_offline(mlp, "image_classifier")
        try:
            assert model.runs_direct
            delivered: list[dict[str, np.ndarray]] = []
            await model.score_chunks({"image": images}, [(0, 12), (12, 20)], 8,
                                     delivered.append)
            served = []
            for begin in range(0, 20, 8):
                response = await model.submit(InferRequest(
                    "image_classifier", model.version, str(begin),
                    {"image": images[begin:begin + 8]}, {"image": DataType.UINT8}))
                served.append(response.outputs[0].data)
            return delivered, served
        finally:
            await model.close()

    delivered, served = asyncio.run(both())
    assert [len(chunk["scores"]) for chunk in delivered] == [12, 8]
    np.testing.assert_allclose(np.concatenate([c["scores"] for c in delivered]),
                               np.concatenate(served), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("short.csv", "f0,f1\n1,2\n3,4\n", "input 'input' takes 64 values per row (dims [64]); "
     "the file gives 2 (columns f0..f1)"),
    ("word.csv", "id," + ",".join(f"f{i}" for i in range(64)) + "\n"
     + "7," + ",".join(["0.5"] * 64) + "\n" + "8," + ",".join(["0.5"] * 30 + ["abc"]
                                                              + ["0.5"] * 33) + "\n",
     "column 'f30', row 1: 'abc' is not a number"),
    ("ragged.csv", "a,b\n1,2\n3\n", "row 1 (line 3) has 1 cells; the header names 2 columns"),
    ("other.npz", None, "missing array for input(s) ['input']; the file has ['features']"),
    ("dup.csv", "id," + ",".join(f"f{i}" for i in range(64)) + "\n"
     + "\n".join("7," + ",".join(["0.5"] * 64) for _ in range(2)) + "\n",
     "column 'id', row 1: id '7' repeats row 0"),
    ("rows.txt", "", "unsupported input file"),
])
def test_bad_files_name_the_row_or_column(mlp: Path, tmp_path: Path, name: str,
                                          content: str | None, message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / name
    if content is None:
        np.savez(path, features=np.zeros((3, 64), np.float32))
    else:
        path.write_text(content)
    code = main(["batch", "--model", "mlp_classifier", "--repository", str(mlp), "--input",
                 str(path), "--output", f"sqlite:///{tmp_path / 'out.db'}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cron_syntax() -> None:
    schedule = cron.parse("*/15 9-17 * * 1-5")
    import datetime

    monday = datetime.datetime(2026, 12, 7, 17, 50, 3)
    assert schedule.next_after(monday) == datetime.datetime(2026, 12, 8, 9, 0, 0)
    assert cron.parse("*/10 * * * * *").next_after(monday) == monday.replace(second=10)
    with pytest.raises(ValueError, match="minute field '61'"):
        cron.parse("61 * * * *")


def test_watch_scores_a_new_file_once(mlp: Path, features: np.ndarray,
                                      tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    url = f"sqlite:///{tmp_path / 'out.db'}"
    reported: list[Path] = []

    async def run() -> None:
        scored = asyncio.Event()
        model = await open_offline(mlp, "mlp_classifier", "2")
        sink = Sink(url, "predictions", model.spec)
        sink.create()
        stop = asyncio.Event()
        task = asyncio.create_task(run_schedule(
            model, sink, cron.parse("* * * * * *"), folder, None,
            Options(batch_size=64, chunk_rows=128, progress=False), stop,
            lambda path, outcome: (reported.append(path), scored.set())))
        np.savez(folder / "a.npz", input=features[:100])
        await asyncio.wait_for(scored.wait(), 30)
        # The same rows under another name, and a later tick: nothing scored again.
        (folder / "copy.npz").write_bytes((folder / "a.npz").read_bytes())
        await asyncio.sleep(2.2)
        stop.set()
        await task
        sink.close()
        await model.close()

    asyncio.run(run())
    assert reported == [folder / "a.npz"]
    assert len(read_predictions(url)) == 100


def test_the_writer_stops_at_the_first_refusal_and_unblocks_the_scorer() -> None:
    """Chunks are written in order; after a refused one, the waiting ones are dropped and
    the scoring side's next put (even one blocked on the full queue) raises the refusal."""
    written: list[int] = []
    release = threading.Event()

    def write(chunk: int) -> None:
        release.wait(10)
        if chunk == 1:
            raise SinkError("quota reached")
        written.append(chunk)

    writer: ChunkWriter[int] = ChunkWriter(write, depth=2)
    for chunk in range(4):  # 0 is being written, 1 and 2 wait, 3 would block
        if chunk == 3:
            threading.Timer(0.2, release.set).start()
        try:
            writer.put(chunk)
        except SinkError:
            break
    with pytest.raises(SinkError, match="quota reached"):
        for chunk in range(4, 50):  # the refusal reaches the scoring side within a few puts
            writer.put(chunk)
    with pytest.raises(SinkError, match="quota reached"):
        writer.close()
    assert written == [0]
