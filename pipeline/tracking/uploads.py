"""A background queue of MLflow writes (metrics, artifact folders): training never waits on the tracking store.

One thread sends the jobs in order and retries each until the store takes it, so a tracking server that goes
away mid-run delays the writes instead of stopping the training or losing them. Why not MLflow's own
asynchronous logging (`log_batch(synchronous=False)`, Lightning's `MLFlowLogger(synchronous=False)`): in MLflow
3.17 its queue hands each batch to a pool of 10 threads, and a batch whose HTTP retries run out (7 retries with
back-off, about 4 minutes) is logged as an error and dropped; artifacts have no asynchronous path at all.
"""

from __future__ import annotations

import itertools
import shutil
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import requests
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.tracking import store

# MLflow's limit of metrics in one log_batch request: consecutive metric jobs are merged up to it.
MAX_METRICS_PER_REQUEST = 1000


def refused(err: BaseException) -> bool:
    """Whether the store rejected a write (a 4xx answer other than 429): sending it again cannot succeed."""
    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
    elif isinstance(err, requests.HTTPError) and err.response is not None:
        status = err.response.status_code
    else:
        return False  # connection errors, timeouts, 5xx, a locked SQLite file: transient
    return 400 <= status < 500 and status != 429


@dataclass
class Job:
    """One write: metric values, or a local folder uploaded as artifact folder `artifact_path` and then deleted."""

    run_id: str
    metrics: list[Metric] = field(default_factory=list)
    folder: Path | None = None
    artifact_path: str | None = None
    # A newer job for the same artifact path makes this one pointless (`last`/`best` are replaced in place).
    replaceable: bool = False

    def files(self) -> list[str]:
        """The artifact files this job uploads (empty for metrics)."""
        if self.folder is None or not self.folder.is_dir():
            return []
        prefix = f"{self.artifact_path}/" if self.artifact_path else ""
        return [prefix + p.name for p in sorted(self.folder.iterdir())]


def describe(jobs: list[Job]) -> str:
    """What `jobs` write, in a few words: "12 metric values, last/last.ckpt, …"."""
    files = [f for job in jobs for f in job.files() if not f.endswith(("/metadata.yaml", "/aliases.txt"))]
    values = sum(len(job.metrics) for job in jobs)
    parts = ([f"{values} metric values"] if values else []) + files[:6] + (["…"] if len(files) > 6 else [])
    return ", ".join(parts) or "nothing"


class UploadQueue:
    """Ordered MLflow writes on one background thread, retried until the store is back; `drain` waits for them."""

    def __init__(self, tracking_uri: str, staging_dir: str | Path, max_retry_interval: float = 10.0) -> None:
        self.tracking_uri = tracking_uri
        self.staging_dir = Path(staging_dir)
        self.max_retry_interval = max_retry_interval
        self._jobs: deque[Job] = deque()
        self._in_flight: list[Job] = []
        self._cond = threading.Condition()
        self._abandon = threading.Event()
        self._thread: threading.Thread | None = None
        self._names = itertools.count()
        self._client: MlflowClient | None = None
        self._outage = False  # the store did not take the last try

    def staging_folder(self) -> Path:
        """A new empty folder under the staging dir, for the files of one artifact job.

        The first call empties the staging dir: what is there was left by a killed process of the same run (a
        resumed run uploads its checkpoints again), and its names would clash with this queue's.
        """
        number = next(self._names)
        if number == 0 and self.staging_dir.is_dir():
            stale = sorted(p.name for p in self.staging_dir.glob("*/*"))
            if stale:
                shown = ", ".join(stale[:6]) + (" …" if len(stale) > 6 else "")
                print(f"Removing {len(stale)} files an earlier process left unsent in {self.staging_dir}: {shown}",
                      file=sys.stderr, flush=True)  # fmt: skip
            shutil.rmtree(self.staging_dir)
        folder = self.staging_dir / f"{number:06d}"
        folder.mkdir(parents=True)
        return folder

    def put_metrics(self, run_id: str, metrics: list[Metric]) -> None:
        """Queue metric values (sent in order, merged into batches)."""
        if metrics:
            self._put(Job(run_id, metrics=list(metrics)))

    def put_folder(self, run_id: str, folder: Path, artifact_path: str | None, replaceable: bool = False) -> None:
        """Queue uploading `folder`'s files into `artifact_path`; with `replaceable`, drop a pending older upload
        to the same path (its files would be overwritten anyway), so an outage keeps at most one waiting copy."""
        with self._cond:
            if replaceable:
                key = (run_id, artifact_path)
                for old in [j for j in self._jobs if j.replaceable and (j.run_id, j.artifact_path) == key]:
                    self._jobs.remove(old)
                    shutil.rmtree(old.folder, ignore_errors=True)
            self._put(Job(run_id, folder=folder, artifact_path=artifact_path, replaceable=replaceable))

    def _put(self, job: Job) -> None:
        with self._cond:
            self._jobs.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._abandon.clear()
                self._thread = threading.Thread(target=self._work, name="mlflow-uploads", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self) -> list[Job]:
        """The jobs not yet in the store: the one being sent first, then the queue."""
        with self._cond:
            return [*self._in_flight, *self._jobs]

    def wait_for_metrics(self, timeout: float) -> bool:
        """Wait up to `timeout` s until no metric values are queued or being sent (at once during an outage)."""
        with self._cond:
            return self._outage or self._cond.wait_for(
                lambda: self._outage or not any(job.metrics for job in (*self._in_flight, *self._jobs)), timeout
            )

    def drain(self, timeout: float) -> list[Job]:
        """Wait up to `timeout` s until everything queued is in the store; return what is left (then abandoned)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._jobs or self._in_flight:
                self._cond.wait_for(lambda: not (self._jobs or self._in_flight), timeout=min(1.0, timeout))
            if self._jobs or self._in_flight:
                print(f"Waiting up to {timeout:g} s (logger.drain_timeout) for queued MLflow writes to reach "
                      f"{self.tracking_uri}: {describe([*self._in_flight, *self._jobs])}",
                      file=sys.stderr, flush=True)  # fmt: skip
            self._cond.wait_for(lambda: not (self._jobs or self._in_flight), timeout=deadline - time.monotonic())
            left = [*self._in_flight, *self._jobs]
            if left:
                self._abandon.set()  # the thread stops retrying; the staged files stay for the message
                self._jobs.clear()
            else:
                self._cond.notify_all()
        if not left and self.staging_dir.is_dir() and not any(self.staging_dir.iterdir()):
            self.staging_dir.rmdir()
        return left

    def _take(self) -> list[Job] | None:
        """The next job (consecutive metric jobs of one run merged up to MLflow's batch limit); None: stop."""
        with self._cond:
            # Idle for a minute, or abandoned: this thread ends (forgotten under the lock, so a put starts another).
            self._cond.wait_for(lambda: self._jobs or self._abandon.is_set(), timeout=60)
            if not self._jobs or self._abandon.is_set():
                self._thread = None
                return None
            batch = [self._jobs.popleft()]
            if batch[0].folder is None:
                count = len(batch[0].metrics)
                while (self._jobs and self._jobs[0].folder is None and self._jobs[0].run_id == batch[0].run_id
                       and count + len(self._jobs[0].metrics) <= MAX_METRICS_PER_REQUEST):  # fmt: skip
                    count += len(self._jobs[0].metrics)
                    batch.append(self._jobs.popleft())
            self._in_flight = batch
            return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            self._send_until_taken(batch)
            with self._cond:
                if not self._abandon.is_set():
                    for job in batch:
                        if job.folder is not None:
                            shutil.rmtree(job.folder, ignore_errors=True)
                self._in_flight = []
                self._cond.notify_all()

    def _send_until_taken(self, batch: list[Job]) -> None:
        """Send `batch`, retrying with back-off (1 s doubling up to `max_retry_interval`) until the store takes it,
        refuses it, or the queue is abandoned; each try first asks an http server's /health, which fails in
        seconds, instead of entering MLflow's own minutes of retries."""
        delay, outage_since = 1.0, None
        while not self._abandon.is_set():
            try:
                reason = store.unreachable(self.tracking_uri)
                if reason is not None:
                    raise ConnectionError(reason)
                self._send(batch)
                self._outage = False
                if outage_since is not None:
                    print(f"MLflow store {self.tracking_uri} is back after {time.monotonic() - outage_since:.0f} s, "
                          f"sending {describe(self.pending())}", file=sys.stderr, flush=True)  # fmt: skip
                return
            except Exception as err:
                if refused(err):
                    print(f"MLflow refused {describe(batch)}, dropped: {err}", file=sys.stderr, flush=True)
                    return
                self._outage = True
                if outage_since is None:
                    outage_since = time.monotonic()
                    print(f"MLflow store {self.tracking_uri} is not answering ({err}); training goes on, metrics and "
                          f"checkpoints are queued and retried every {self.max_retry_interval:g} s or less",
                          file=sys.stderr, flush=True)  # fmt: skip
            self._abandon.wait(delay)
            delay = min(2 * delay, self.max_retry_interval)

    def _send(self, batch: list[Job]) -> None:
        if self._client is None:
            self._client = store.client(self.tracking_uri)
        if batch[0].folder is None:
            self._client.log_batch(batch[0].run_id, metrics=[m for job in batch for m in job.metrics])
        else:
            self._client.log_artifacts(batch[0].run_id, str(batch[0].folder), batch[0].artifact_path)
