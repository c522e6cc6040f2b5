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
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from gunicorn.app.wsgiapp import WSGIApplication
from gunicorn.arbiter import Arbiter

from ctcd.seams import pause_point
from ctcd.serving import desired as ds


class ConvergingArbiter(Arbiter):  # type: ignore[misc]
    """gunicorn's arbiter with `manage_workers` driven by the desired-state file."""

    def setup(self, app: Any) -> None:
        super().setup(app)
        self.runtime = Path(os.environ["CTCD_SERVICE_DIR"])
        self.leaving: set[int] = set()
        self.converged_on: tuple[Any, ...] = ()
        folder = self.runtime / ds.WORKERS
        folder.mkdir(exist_ok=True)
        for leftover in folder.iterdir():  # announcements of a previous master's workers
            leftover.unlink(missing_ok=True)

    def manage_workers(self) -> None:
        want = ds.read_desired(self.runtime)
        if want is None:
            super().manage_workers()
            return
        self._forget_exited()
        groups = self._classify(want)
        if groups is None:  # the desired version was rejected just now: read the revert
            want = ds.read_desired(self.runtime) or want
            groups = self._classify(want)
            if groups is None:
                return
        good, stale, loading = groups
        count = int(want["workers"])
        if self.num_workers != count:  # type: ignore[has-type]
            self.num_workers = count
        self._step(want, count, good, stale, loading)

    def _forget_exited(self) -> None:
        self.leaving &= set(self.WORKERS)
        for path in (self.runtime / ds.WORKERS).iterdir():
            if path.stem.isdigit() and int(path.stem) not in self.WORKERS:
                path.unlink(missing_ok=True)

    def _classify(self, want: dict[str, Any]) -> tuple[list[int], list[int], list[int]] | None:
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
            elif said.get("fallback") and said.get("generation") == want["generation"]:
                self._reject(want, said)
                return None
            else:
                (good if ds.serves(said, want) else stale).append(pid)
        return good, stale, loading

    def _reject(self, want: dict[str, Any], said: dict[str, Any]) -> None:
        reason = f"a worker could not load or score it: {said.get('error')}"
        version = want["model_version"]
        if ds.revert_to_stable(self.runtime, int(want["workers"]), want["generation"], version,
                               reason):  # fmt: skip
            self.log.error("ctcd: version %s rejected (%s); serving the stable version again",
                           version, reason)  # fmt: skip

    def _step(
        self,
        want: dict[str, Any],
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
            self._retire(pid, f"it serves another version than {want['model_version']}")
            stale = stale[1:]
            serving -= 1
        if stale:
            if not loading and serving + len(loading) <= count:
                self.log.info("ctcd: starting a worker for version %s", want["model_version"])
                self.spawn_worker()
            return
        extra = len(good) + len(loading) - count
        for pid in (loading + good)[: max(0, extra)]:
            self._retire(pid, f"{count} workers are wanted")
        for _ in range(count - len(good) - len(loading)):
            self.spawn_worker()
        seen: ds.Seen = [(pid, str(want["model_version"]), False) for pid in good]
        seen += [(pid, None, False) for pid in loading] + [(p, None, True) for p in self.leaving]
        if ds.converged(seen, want):
            self._converged(want)

    def _retire(self, pid: int, why: str) -> None:
        self.log.info("ctcd: retiring worker %s: %s", pid, why)
        self.leaving.add(pid)
        (self.runtime / ds.WORKERS / f"{pid}.leaving").touch()
        self.kill_worker(pid, signal.SIGTERM)
        pause_point("master-retired", self.runtime)

    def _converged(self, want: dict[str, Any]) -> None:
        key = (want["generation"], want["model_version"], want["workers"])
        if key == self.converged_on:
            return
        self.converged_on = key
        ds.write_stable(self.runtime, want)
        self.log.info(
            "ctcd: all %s workers serve version %s", want["workers"], want["model_version"]
        )


class ServerApp(WSGIApplication):  # type: ignore[misc]
    """gunicorn's command-line application, run by `ConvergingArbiter` (ctcd's servers never
    daemonize or print their config, the only other things gunicorn's `run` does)."""

    def run(self) -> None:
        ConvergingArbiter(self).run()


def main() -> None:
    ServerApp("%(prog)s [OPTIONS] [APP_MODULE]").run()


if __name__ == "__main__":
    main()
