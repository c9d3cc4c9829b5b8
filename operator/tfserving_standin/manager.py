"""One servable's versions over time: the file-system source, the manager and the state monitor in one.

It follows the real server's default policies: only the highest numbered version is aspired (latest policy), a
new aspired version loads while the old one keeps serving and the old one is unloaded once the new one is
AVAILABLE (availability preserving policy); a version whose folder is gone is unloaded; a failed load is retried
``max_num_load_retries`` times, ``load_retry_interval_micros`` apart, then the version ends in error and is not
tried again while it stays the aspired one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from . import log
from .loader import SOURCE, LoadedModel, list_versions, load_version, unload
from .metrics import Metrics
from .status import StatusError

HARNESS = "tensorflow_serving/core/loader_harness.cc"
RETRIER = "tensorflow_serving/util/retrier.cc"


@dataclass(frozen=True)
class VersionState:
    state: str  # START, LOADING, AVAILABLE, UNLOADING, END
    error: StatusError | None = None


class Servable:
    def __init__(self, options: dict, metrics: Metrics, workdir: Path) -> None:
        self.name: str = options["model_name"]
        self.base_path: str = options["model_base_path"]
        self.tags = set(options["saved_model_tags"].split(","))
        # Retry takes a uint32: a negative count wraps to a practically endless one.
        self.max_retries: int = options["max_num_load_retries"] % 2**32
        self.retry_interval = max(options["load_retry_interval_micros"], 0) / 1e6
        self.poll_wait: int = options["file_system_poll_wait_seconds"]
        self.metrics = metrics
        self.workdir = workdir
        self.stopping = threading.Event()
        self.settled = threading.Event()  # the first aspired version reached AVAILABLE or failed for good
        self.startup_error: StatusError | None = None
        self._lock = threading.Lock()
        self._states: dict[int, VersionState] = {}
        self._loaded: dict[int, LoadedModel] = {}
        self._failed: set[int] = set()

    def id(self, version: int) -> str:
        return f"{{name: {self.name} version: {version}}}"

    # What the REST API reads.
    def states(self) -> dict[int, VersionState]:
        with self._lock:
            return dict(self._states)

    def model(self, version: int | None) -> LoadedModel | None:
        """The version asked for if AVAILABLE, or the highest AVAILABLE one."""
        with self._lock:
            if version is not None:
                return self._loaded.get(version)
            return self._loaded[max(self._loaded)] if self._loaded else None

    # The polling thread.
    def run(self) -> None:
        if self.poll_wait < 0:
            return  # polling disabled: nothing is ever aspired and start-up waits for ever, as the real one does
        while not self.stopping.is_set():
            self._poll()
            if self.poll_wait == 0 or self.stopping.wait(self.poll_wait):
                return

    def _poll(self) -> None:
        try:
            versions = list_versions(self.name, self.base_path)
        except StatusError as exc:
            log.error(SOURCE, f"FileSystemStoragePathSource encountered a filesystem access error: {exc.message}")
            return
        if not versions:
            log.warning(
                SOURCE,
                f"No versions of servable {self.name} found under base path {self.base_path}. "
                "Did you forget to name your leaf directory as a number (eg. '/1/')?",
            )
            for version in list(self._loaded):
                self._unload(version)
            return
        aspired = max(versions)
        self._failed &= {aspired}  # an errored version that is no longer aspired is forgotten
        if aspired in self._loaded or aspired in self._failed:
            return
        self._load(aspired, versions[aspired])
        if aspired in self._loaded:  # the old version served until the new one was AVAILABLE
            for version in [v for v in self._loaded if v != aspired]:
                self._unload(version)

    def _set(self, version: int, state: VersionState) -> None:
        with self._lock:
            self._states[version] = state

    def _load(self, version: int, path: str) -> None:
        self._set(version, VersionState("START"))
        log.info(HARNESS, f"Approving load for servable version {self.id(version)}")
        self._set(version, VersionState("LOADING"))
        log.info(HARNESS, f"Loading servable version {self.id(version)}")
        description = f"Loading servable: {self.id(version)}"
        attempt = 0
        while True:
            if attempt:
                if self.stopping.wait(self.retry_interval):
                    return
                log.info(RETRIER, f"Retrying of {description} retry: {attempt}")
            try:
                model = load_version(self.name, version, path, self.tags, self.workdir)
                break
            except StatusError as exc:
                log.error(RETRIER, f"{description} failed: {exc}")
                error = exc
            attempt += 1
            if attempt >= self.max_retries + 1:
                log.info(RETRIER, f"Retrying of {description} exhausted max_num_retries: {self.max_retries}")
                log.info(HARNESS, f"Encountered an error for servable version {self.id(version)}: {error}")
                self._failed.add(version)
                self._set(version, VersionState("END", error))
                self._settle(error, version)
                return
        self.metrics.loaded(path, model.load_micros)
        with self._lock:
            self._loaded[version] = model
            self._states[version] = VersionState("AVAILABLE")
        log.info(HARNESS, f"Successfully loaded servable version {self.id(version)}")
        self._settle(None, version)

    def _settle(self, error: StatusError | None, version: int) -> None:
        if not self.settled.is_set():
            if error is not None:
                self.startup_error = StatusError(
                    "UNKNOWN", f"1 model(s) did not become available: {{{self.id(version)} due to error: {error}}}, }}"
                )
            self.settled.set()

    def _unload(self, version: int) -> None:
        self._set(version, VersionState("UNLOADING"))
        log.info(HARNESS, f"Quiescing servable version {self.id(version)}")
        with self._lock:
            model = self._loaded.pop(version)
        log.info(HARNESS, f"Unloading just-loaded servable version {self.id(version)}")
        unload(model)
        self._set(version, VersionState("END"))
        log.info(HARNESS, f"Done unloading servable version {self.id(version)}")
