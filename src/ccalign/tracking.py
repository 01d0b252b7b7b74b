"""MLflow runs with lineage for every stage, robust to an unreachable tracking server.

Every stage wraps its work in :func:`stage_run`. The run records the resolved config (flattened) as params,
the job's labels as tags with the same keys for every stage (``stage``, ``family``, ``model``, ``seed``,
``objective``, ``lambda``, ``guidance``, ...), lineage tags (git commit and dirty flag, config hash, input
hashes, Slurm job id, the pipeline invocation's group id), metrics and artifacts. Its name reads like the
experiment: ``sample · llamagen_tiny · cca λ=3 · g=1 · seed 0``. Only rank 0 of a torchrun job records.

If the tracking server cannot be reached, or stops answering mid-run, the stage still completes: the whole
run is kept in memory and written to ``<data_root>/mlflow/pending/*.json``; the next stage that reaches the
server replays those records (a warning says so both times). A record being replayed is claimed by renaming
it to ``*.sending-<pid>@<host>``; a claim whose process died (killed mid-replay) is taken back by the next
replay, which also closes the runs that earlier, interrupted attempts opened on the server. When even the
local record cannot be written (a full disk), a warning says so and the stage still succeeds.

With ``tracking.defer: true`` every stage writes its run that way on purpose, without starting MLflow at all
(several seconds per process, which dominates many short CPU jobs), and the ``report`` stage, the DAG's last
job, sends them all with their original start and end times.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ccalign.device import world
from ccalign.errors import space_errno
from ccalign.io import atomic_write_json, sha256_file
from ccalign.log import get_logger

log = get_logger("tracking")

# Fail fast instead of retrying for minutes against a dead server; telemetry off.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

_MAX_PARAM_LEN = 6000
_FOREIGN_CLAIM_S = 3600  # a replay claim made on another host (pid not checkable here) is stale after this


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def tracking_uri(cfg: dict) -> str:
    """Config's ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else a sqlite store under ``data_root``."""
    uri = (cfg.get("tracking") or {}).get("uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    db = Path(cfg.get("data_root", "data")).resolve() / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def _artifact_root(cfg: dict) -> str:
    return (Path(cfg.get("data_root", "data")).resolve() / "mlflow" / "artifacts").as_uri()


def _pending_dir(cfg: dict) -> Path:
    return Path(cfg.get("data_root", "data")) / "mlflow" / "pending"


def git_lineage() -> dict[str, str]:
    """Commit and dirty flag of the checkout the code runs from (empty when not a git checkout)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(bool(dirty)).lower()}


def run_name(stage: str, labels: dict[str, str]) -> str:
    """``sample · llamagen_tiny · cca λ=3 · g=1 · seed 0`` from a job's labels (β and the unconditional ratio
    follow λ when the variant sets them: ``cca λ=1 β=0.1``)."""
    variant = labels.get("objective")
    if variant:
        symbols = (("lambda", "λ"), ("beta", "β"), ("uncond_ratio", "u"))
        variant = " ".join([variant, *(f"{s}={labels[k]}" for k, s in symbols if labels.get(k) is not None)])
    subjects = ("model", "tokenizer", "dataset", "artifact", "target")
    parts = [
        stage,
        next((labels[k] for k in subjects if k in labels), None),
        variant,
        f"g={labels['guidance']}" if "guidance" in labels else None,
        f"seed {labels['seed']}" if "seed" in labels else None,
    ]
    return " · ".join(p for p in parts if p)


def environment_lineage() -> dict[str, str]:
    """Slurm job id and pipeline group, when the environment names them."""
    names = {
        "CCALIGN_RUN_GROUP": "ccalign.group",
        "SLURM_JOB_ID": "slurm.job_id",
        "SLURM_ARRAY_TASK_ID": "slurm.array_task_id",
    }
    return {tag: os.environ[var] for var, tag in names.items() if os.environ.get(var)}


def input_hashes(paths: dict[str, str | os.PathLike]) -> dict[str, str]:
    """sha256 of each input file; a directory is hashed by its ``manifest.json`` when it has one."""
    out = {}
    for name, p in paths.items():
        p = Path(p)
        if p.is_dir() and (p / "manifest.json").is_file():
            p = p / "manifest.json"
        if p.is_file():
            out[f"input.{name}.sha256"] = sha256_file(p)
    return out


class StageRun:
    """One stage's MLflow run. Every call is recorded locally first, then sent when the server answers."""

    def __init__(self, cfg: dict, name: str, tags: dict[str, str], params: dict[str, Any]) -> None:
        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        self.record: dict[str, Any] = {
            "experiment": cfg.get("experiment", "ccalign"),
            "run_name": name,
            "tags": tags,
            "params": {k: str(v)[:_MAX_PARAM_LEN] for k, v in params.items()},
            "metrics": [],
            "artifacts": [],
            "inputs": [],  # datasets: [name, digest, source]
            "tables": [],  # [columns mapping, artifact file]
            "status": "RUNNING",
            "start_ms": int(time.time() * 1000),
        }
        self.client = None
        self.run_id: str | None = None
        self.offline = False
        self.deferred = False

    # -- connection ----------------------------------------------------------------------------
    def _connect(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        exp = client.get_experiment_by_name(self.record["experiment"])
        if exp is None:
            kwargs = {"artifact_location": _artifact_root(self.cfg)} if self.uri.startswith("sqlite") else {}
            exp_id = client.create_experiment(self.record["experiment"], **kwargs)
        else:
            exp_id = exp.experiment_id
        tags = dict(self.record["tags"])
        if tags.get("ccalign.group"):  # a job of a pipeline invocation: a child of the invocation's run
            tags["mlflow.parentRunId"] = invocation_run(client, exp_id, tags["ccalign.group"], self.cfg)
        run = client.create_run(
            exp_id, start_time=self.record["start_ms"], tags=tags, run_name=self.record["run_name"]
        )
        self.client, self.run_id = client, run.info.run_id
        self.record["run_id"] = self.run_id
        _log_params(client, self.run_id, self.record["params"])

    def _go_offline(self, err: BaseException) -> None:
        if not self.offline:
            log.warning(
                "MLflow tracking at %s unreachable (%s); recording locally and continuing",
                self.uri,
                type(err).__name__,
            )
        self.offline = True

    def _send(self, fn, *args) -> None:
        if self.offline or self.client is None:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - tracking must never fail a stage
            self._go_offline(e)

    # -- public API ----------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        params = {k: str(v)[:_MAX_PARAM_LEN] for k, v in params.items()}
        self.record["params"].update(params)
        self._send(_log_params, self.client, self.run_id, params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        ts = int(time.time() * 1000)
        rows = [(k, float(v), step or 0, ts) for k, v in metrics.items()]
        self.record["metrics"].extend(rows)
        self._send(_log_metrics, self.client, self.run_id, rows)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.record["tags"].update(tags)
        self._send(lambda: [self.client.set_tag(self.run_id, k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.record["artifacts"].append([str(Path(path).resolve()), artifact_path])
        self._send(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_input(self, name: str, digest: str, source: str) -> None:
        """A dataset the run read (the UI's Dataset column): e.g. the code cache, by its manifest hash."""
        self.record["inputs"].append([name, digest, source])
        self._send(_log_inputs, self.client, self.run_id, [[name, digest, source]])

    def log_table(self, columns: dict[str, list], artifact_file: str) -> None:
        """A table (column name → values) as an MLflow table artifact, viewable in the UI."""
        self.record["tables"].append([columns, artifact_file])
        self._send(lambda: self.client.log_table(self.run_id, columns, artifact_file))

    def _finish(self, status: str) -> None:
        self.record["status"] = status
        self.record["end_ms"] = int(time.time() * 1000)
        self._send(lambda: self.client.set_terminated(self.run_id, status, self.record["end_ms"]))
        if self.offline:
            out = _pending_dir(self.cfg) / f"{uuid.uuid4().hex}.json"
            try:
                atomic_write_json(self.record, out)
            except Exception as e:  # noqa: BLE001 - tracking must never fail a stage
                code = space_errno(e)
                reason = os.strerror(code) if code else f"{type(e).__name__}: {e}"
                log.warning("MLflow run of this stage not recorded: cannot write %s (%s)", out, reason)
                return
            if self.deferred:
                log.info("MLflow run buffered at %s (tracking.defer); the report stage sends it", out)
            else:
                log.warning(
                    "MLflow run of this stage buffered at %s; it is replayed when the server is back", out
                )


class _NullRun(StageRun):
    """Stand-in for ranks other than 0: records nothing."""

    def __init__(self) -> None:  # noqa: D107 - nothing to set up
        pass

    def log_params(self, params): ...
    def log_metrics(self, metrics, step=None): ...
    def set_tags(self, tags): ...
    def log_artifact(self, path, artifact_path=None): ...
    def log_input(self, name, digest, source): ...
    def log_table(self, columns, artifact_file): ...


def _log_inputs(client, run_id: str, inputs: list) -> None:
    from mlflow.entities import Dataset, DatasetInput

    datasets = [
        DatasetInput(Dataset(name=n, digest=d[:36], source_type="local", source=s)) for n, d, s in inputs
    ]
    client.log_inputs(run_id, datasets=datasets)


def invocation_run(client, experiment_id: str, group: str, cfg: dict) -> str:
    """The id of the parent run of pipeline invocation ``group``, created by whichever job asks first.

    A lock file under data_root/mlflow keeps two jobs of one invocation from both creating it."""
    import fcntl

    lock = _pending_dir(cfg).parent / f".invocation-{group}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        query = f"tags.`ccalign.group` = '{group}' and tags.`ccalign.role` = 'invocation'"
        found = client.search_runs([experiment_id], filter_string=query, max_results=1)
        if found:
            return found[0].info.run_id
        name = f"pipeline · {cfg.get('experiment', 'ccalign')} · {time.strftime('%Y-%m-%d %H:%M')} · {group}"
        tags = {"ccalign.group": group, "ccalign.role": "invocation", **git_lineage()}
        return client.create_run(experiment_id, tags=tags, run_name=name).info.run_id


def finish_invocation(cfg: dict, group: str, status: str) -> None:
    """Send every buffered run of this data_root and close the invocation's parent run with ``status``.

    Snakemake calls this once the invocation ends (``onsuccess`` / ``onerror``); tracking problems are
    warnings."""
    if not group:
        return
    try:
        replay_pending(cfg)
        from mlflow.tracking import MlflowClient

        _close_invocation(MlflowClient(tracking_uri=tracking_uri(cfg)), cfg, group, status)
    except Exception as e:  # noqa: BLE001 - tracking must never fail the pipeline
        log.warning("could not close the MLflow run of this invocation (%s: %s)", type(e).__name__, e)


def _close_invocation(client, cfg: dict, group: str, status: str) -> None:
    exp = client.get_experiment_by_name(cfg.get("experiment", "ccalign"))
    if exp is None:
        return
    query = f"tags.`ccalign.group` = '{group}' and tags.`ccalign.role` = 'invocation'"
    for parent in client.search_runs([exp.experiment_id], filter_string=query):
        client.set_terminated(parent.info.run_id, status)


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def _log_metrics(client, run_id: str, rows: list) -> None:
    from mlflow.entities import Metric

    items = [Metric(k, v, ts, step) for k, v, step, ts in rows]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def _claim_is_stale(path: Path) -> bool:
    """Whether the process that claimed ``<id>.sending-<pid>@<host>`` is gone: on this host, its pid no
    longer runs; on another host, the claim is older than ``_FOREIGN_CLAIM_S``."""
    pid, _, host = path.name.partition(".sending-")[2].partition("@")
    if not pid.isdigit():
        return False
    if host and host != socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            return time.time() - path.stat().st_ctime > _FOREIGN_CLAIM_S  # ctime: set by the claim's rename
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _reclaim_stale(pending: Path) -> None:
    """Put records whose replaying process died back in the queue."""
    for claimed in pending.glob("*.sending-*"):
        if _claim_is_stale(claimed):
            with contextlib.suppress(FileNotFoundError):  # another replay reclaimed it first
                claimed.rename(claimed.with_name(claimed.name.partition(".sending-")[0] + ".json"))
                log.warning("reclaimed %s: the process replaying it died", claimed)


def replay_pending(cfg: dict) -> int:
    """Send runs buffered while the server was unreachable (or deferred); returns how many were sent.

    Each record is claimed by renaming it first, so two stages replaying at once never send one twice. The
    id of the run an attempt opens is saved in the claimed record before anything is sent, so a later
    attempt closes it (KILLED, tagged with the run that replaced it) if this one dies half-way.
    """
    pending = _pending_dir(cfg)
    _reclaim_stale(pending)
    done, groups, client = 0, set(), None
    for path in sorted(pending.glob("*.json")):
        claimed = path.with_name(f"{path.stem}.sending-{os.getpid()}@{socket.gethostname()}")
        try:
            path.rename(claimed)
        except FileNotFoundError:  # another process took it
            continue
        rec = json.loads(claimed.read_text())
        run = StageRun(cfg, rec["run_name"], dict(rec["tags"]), rec["params"])
        run.record.update(experiment=rec["experiment"])
        run.record["start_ms"] = rec.get("start_ms", run.record["start_ms"])
        run.record["tags"]["ccalign.replayed"] = "true"
        earlier = rec.get("replay_run_ids", [])  # runs opened by interrupted replays of this record
        try:
            run._connect()
            atomic_write_json({**rec, "replay_run_ids": [*earlier, run.run_id]}, claimed)
            # the run that was live when the server went away, and earlier replays: close them, point here
            for old in filter(None, [rec.get("run_id"), *earlier]):
                with contextlib.suppress(Exception):
                    run.client.set_terminated(old, "KILLED")
                    run.client.set_tag(old, "ccalign.replayed_as", run.run_id)
            _log_metrics(run.client, run.run_id, rec["metrics"])
            for p, ap in rec["artifacts"]:
                if Path(p).exists():
                    run.client.log_artifact(run.run_id, p, ap)
            if rec.get("inputs"):
                _log_inputs(run.client, run.run_id, rec["inputs"])
            for columns, artifact_file in rec.get("tables", []):
                run.client.log_table(run.run_id, columns, artifact_file)
            run.client.set_terminated(run.run_id, rec["status"], rec.get("end_ms"))
        except Exception as e:  # noqa: BLE001 - stays pending for the next try
            if run.run_id is not None:  # never leave the run this attempt opened RUNNING
                with contextlib.suppress(Exception):
                    run.client.set_terminated(run.run_id, "FAILED")
            claimed.rename(path)
            log.warning("replay of %s failed (%s); kept for later", path, type(e).__name__)
            break
        claimed.unlink()
        done += 1
        client = run.client
        groups.add(rec["tags"].get("ccalign.group"))
    # invocations that ended before their runs could be sent: their parent runs are done too
    for group in groups - {None, os.environ.get("CCALIGN_RUN_GROUP")}:
        with contextlib.suppress(Exception):
            _close_invocation(client, cfg, group, "FINISHED")
    if done:
        log.info("sent %d buffered MLflow run(s)", done)
    return done


@contextlib.contextmanager
def stage_run(
    cfg: dict,
    stage: str,
    labels: dict[str, str],
    tags: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    inputs: dict[str, str | os.PathLike] | None = None,
    defer: bool | None = None,
) -> Iterator[StageRun]:
    """Record one job of ``stage`` as an MLflow run (rank 0 only); never lets tracking fail the stage.

    ``labels`` (the job's lineage) become tags under their own names and the run's name; ``tags`` add more.
    ``defer`` (default: the config's ``tracking.defer``) buffers the run under ``pending/`` without starting
    MLflow; a stage that sends (``defer=False``) also sends every buffered run first.
    """
    if world()[0] != 0:
        yield _NullRun()
        return
    from ccalign.config import config_hash

    all_tags = {
        "stage": stage,
        **labels,
        "ccalign.config_hash": config_hash(cfg),
        **git_lineage(),
        **environment_lineage(),
        **input_hashes(inputs or {}),
    }
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    all_params = {**flatten(cfg), **(params or {})}
    run = StageRun(cfg, run_name(stage, labels), all_tags, all_params)
    if defer is None:
        defer = bool((cfg.get("tracking") or {}).get("defer", False))
    if defer:
        run.offline = run.deferred = True
    else:
        try:
            run._connect()
        except Exception as e:  # noqa: BLE001 - offline mode
            run._go_offline(e)
    if not run.offline:
        with contextlib.suppress(Exception):
            replay_pending(cfg)
    try:
        yield run
    except BaseException:
        run._finish("FAILED")
        raise
    run._finish("FINISHED")
