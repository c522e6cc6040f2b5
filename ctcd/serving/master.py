"""The gunicorn master of a local model server, converging its workers on the desired state.

`python -m ctcd.serving.master [gunicorn options] ctcd.serving.app:app` runs gunicorn with
`ConvergingArbiter`, which replaces gunicorn's fixed worker count with `current.json` (see
`ctcd.serving.desired`): on every loop tick (at most a second apart, and at once after any
signal) it compares the workers' announcements with the desired version and count and takes
one step of a rolling swap. It starts one new worker while the old ones serve; once that
worker has loaded the model and scored its input example (announced), it retires an old one
(SIGTERM: it drains its requests). A worker that fell back to `stable.json` means the desired
version cannot serve: the master then sets the desired state back to the stable version,
naming the rejected one, and converges on that. Leftover workers, from anything, are retired;
missing ones are started. So a swap does not depend on the process that asked for it.

Once every worker serves the desired state, the master records it in `stable.json`, with the
version appended to the server's history: what really served, even when the deploy that asked
for it was killed before it could write the server's record. While `current.json` cannot be
read (garbled, deleted) the master changes nothing it does not have to: the workers keep
serving, a worker that dies is replaced by one serving the stable version, and the log says
once what is wrong; a deploy or `ctcd models start` rewrites the file. No error of its own
stops the master: it logs it and tries again at the next tick.
"""

from __future__ import annotations

import os
import signal
from contextlib import suppress
from pathlib import Path
from typing import Any

from gunicorn.app.wsgiapp import WSGIApplication
from gunicorn.arbiter import Arbiter

from ctcd.exceptions import StateFileError
from ctcd.seams import pause_point
from ctcd.serving import desired as ds


class ConvergingArbiter(Arbiter):  # type: ignore[misc]
    """gunicorn's arbiter with `manage_workers` driven by the desired-state file."""

    def setup(self, app: Any) -> None:
        super().setup(app)
        self.runtime = Path(os.environ["CTCD_SERVICE_DIR"])
        self.leaving: set[int] = set()
        self.converged_on: tuple[Any, ...] = ()
        self.problem: str | None = None  # why the desired state cannot be read, if it cannot
        folder = self.runtime / ds.WORKERS
        folder.mkdir(exist_ok=True)
        for leftover in folder.iterdir():  # announcements of a previous master's workers
            leftover.unlink(missing_ok=True)

    def manage_workers(self) -> None:
        """One step towards the desired state. Nothing here may end the master (gunicorn
        stops on an exception from its loop): an error is logged and the next tick retries."""
        try:
            self._manage()
        except Exception:
            self.log.exception("ctcd: managing the workers failed; retrying at the next tick")

    def _manage(self) -> None:
        want = self._desired()
        if want is None:
            return
        self._forget_exited()
        groups = self._classify(want)
        if groups is None:  # the desired version was rejected just now: read the revert
            want = self._desired() or want
            groups = self._classify(want)
            if groups is None:
                return
        good, stale, loading = groups
        if self.num_workers != want.workers:  # type: ignore[has-type]
            self.num_workers = want.workers
        self._step(want, want.workers, good, stale, loading)

    def _desired(self) -> ds.DesiredState | None:
        """The desired state; while it cannot be read (garbled, missing), the stable model on
        the workers running now, so the server serves on and replaces a worker that dies with
        one of the same version; None (change nothing) when there is no stable model either."""
        try:
            want = ds.read_desired(self.runtime)
            problem = None if want else f"{self.runtime / ds.CURRENT} is missing"
        except StateFileError as err:
            want, problem = None, str(err)
        if problem != self.problem:
            if problem:
                self.log.error("ctcd: %s; holding the workers on the stable version", problem)
            else:
                self.log.info("ctcd: the desired state is readable again")
            self.problem = problem
        if want is not None:
            return want
        return ds.holding_state(self.runtime, self.num_workers)

    def _forget_exited(self) -> None:
        self.leaving &= set(self.WORKERS)
        for path in (self.runtime / ds.WORKERS).iterdir():
            if path.stem.isdigit() and int(path.stem) not in self.WORKERS:
                path.unlink(missing_ok=True)

    def _classify(self, want: ds.DesiredState) -> tuple[list[int], list[int], list[int]] | None:
        """Live workers (oldest first, leaving ones aside) as serving the desired version,
        serving another one, or still loading; None if a worker just rejected the version."""
        good: list[int] = []
        stale: list[int] = []
        loading: list[int] = []
        for pid, _ in sorted(self.WORKERS.items(), key=lambda item: item[1].age):
            if pid in self.leaving:
                continue
            said = ds.announcement(self.runtime, pid)
            if said is None:
                loading.append(pid)
            elif said.get("fallback") and said.get("generation") == want.generation:
                if self.problem is None:
                    self._reject(want, said)
                    return None
                stale.append(pid)
            else:
                (good if ds.serves(said, want) else stale).append(pid)
        return good, stale, loading

    def _reject(self, want: ds.DesiredState, said: dict[str, Any]) -> None:
        reason = f"a worker could not load or score it: {said.get('error')}"
        version = str(said.get("failed_version") or want.model_version)
        if ds.revert_to_stable(self.runtime, want.workers, want.generation, version, reason):
            self.log.error("ctcd: version %s rejected (%s); serving the stable version again",
                           version, reason)  # fmt: skip

    def _step(
        self,
        want: ds.DesiredState,
        count: int,
        good: list[int],
        stale: list[int],
        loading: list[int],
    ) -> None:
        """One step towards `count` workers all serving the desired version, never dropping
        below `count` serving workers while old ones can still serve, one extra at most."""
        serving = len(good) + len(stale)
        for pid in stale:  # oldest first
            if serving <= count:
                break
            self._retire(pid, f"it serves another version than {want.model_version}")
            stale = stale[1:]
            serving -= 1
        if stale:
            if not loading and serving + len(loading) <= count:
                self.log.info("ctcd: starting a worker for version %s", want.model_version)
                self.spawn_worker()
            return
        extra = len(good) + len(loading) - count
        for pid in (loading + good)[: max(0, extra)]:
            self._retire(pid, f"{count} workers are wanted")
        for _ in range(count - len(good) - len(loading)):
            self.spawn_worker()
        seen: ds.Seen = [(pid, ds.wanted(want), False) for pid in good]
        seen += [(pid, None, False) for pid in loading] + [(p, None, True) for p in self.leaving]
        if ds.converged(seen, want):
            self._converged(want)

    def _retire(self, pid: int, why: str) -> None:
        self.log.info("ctcd: retiring worker %s: %s", pid, why)
        self.leaving.add(pid)
        with suppress(OSError):  # a full disk must not keep the worker from leaving
            (self.runtime / ds.WORKERS / f"{pid}.leaving").touch()
        self.kill_worker(pid, signal.SIGTERM)
        pause_point("master-retired", self.runtime)

    def _converged(self, want: ds.DesiredState) -> None:
        """Record that the workers serve `want` (`stable.json`: the model and its history),
        once per generation; not while holding on an unreadable desired state."""
        key = (want.generation, ds.wanted(want), want.workers)
        if key == self.converged_on or self.problem is not None:
            return
        try:
            ds.write_stable(self.runtime, want)
        except OSError as err:  # e.g. the disk is full: the next tick tries again
            self.log.error("ctcd: cannot record the stable version (%s); retrying", err)
            return
        self.converged_on = key
        self.log.info("ctcd: all %s workers serve version %s", want.workers, ds.wanted(want))


class ServerApp(WSGIApplication):  # type: ignore[misc]
    """gunicorn's command-line application, run by `ConvergingArbiter` (ctcd's servers never
    daemonize or print their config, the only other things gunicorn's `run` does)."""

    def run(self) -> None:
        ConvergingArbiter(self).run()


def main() -> None:
    ServerApp("%(prog)s [OPTIONS] [APP_MODULE]").run()


if __name__ == "__main__":
    main()
