"""Weights & Biases as a metric sink that never costs the run (``logging.wandb``).

The first failure (no wandb, no credentials, a network that hangs, a service that dies) becomes
one warning, after which the run goes on without W&B (metrics.jsonl has every record). Every call
that can wait on the network or on wandb's service process (init, log, finish, teardown) runs
under a deadline (``_bounded``); an online run without credentials falls back to offline.
"""

from __future__ import annotations

import json
import netrc
import os
import queue
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from megatron_ext.config.loader import ConfigError
from megatron_ext.config.schema import LoggingConfig
from megatron_ext.platform.fs import atomic_write
from megatron_ext.training.console import MOCK_TAG, warn
from megatron_ext.training.console import reason as _reason


def _wandb_has_credentials() -> bool:
    """Whether ``wandb.init(mode="online")`` finds credentials without prompting.

    Looks where the SDK (0.31) looks: WANDB_API_KEY, an identity token file, or a netrc entry
    for the W&B host (WANDB_BASE_URL, default api.wandb.ai; a self-hosted server has its own
    entry) in $NETRC, else ~/.netrc, else ~/_netrc. An unreadable netrc counts as none: the
    fallback must never crash a training run.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    try:
        if os.environ.get("NETRC"):
            candidates = [Path(os.environ["NETRC"]).expanduser()]
        else:
            candidates = [Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()]
        for path in candidates:
            if path.is_file():  # the SDK reads only the first file found
                entry = netrc.netrc(str(path)).authenticators(host)
                return bool(entry and entry[2])  # the API key is the password field
    except (OSError, RuntimeError, netrc.NetrcParseError):  # RuntimeError: no home directory
        return False
    return False


# ----------------------------------------------------------------------------- environment
# The variables W&B users set on a cluster (in ~/.bashrc, a job script, a module) select what
# these logging.wandb fields select. They override the config file, which describes the
# experiment, not the site; `--set` overrides them, being this run's own command line.
ENV_FIELDS = {"WANDB_MODE": "mode", "WANDB_PROJECT": "project", "WANDB_ENTITY": "entity",
              "WANDB_RUN_GROUP": "group", "WANDB_DIR": "dir"}
# wandb's own spellings of the modes ("dryrun" and "run" are its older names)
_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
              "disabled": "disabled"}


def env_overrides(environ: dict[str, str] | None = None) -> list[str]:
    """``--set``-style overrides (``logging.wandb.mode="offline"``, ...) from the W&B variables
    in ``environ`` (default: the process environment). Set but empty counts as unset; a mode
    wandb does not know is a ConfigError naming the variable. Each value is quoted as JSON, a
    YAML string, so that e.g. a project named ``123`` or ``null`` stays that string."""
    environ = os.environ if environ is None else environ
    out = []
    for var, field in ENV_FIELDS.items():
        value = environ.get(var, "").strip()
        if not value:
            continue
        if field == "mode":
            if value.lower() not in _ENV_MODES:
                raise ConfigError(f"{var}={value!r}: expected online, offline or disabled")
            value = _ENV_MODES[value.lower()]
        out.append(f"logging.wandb.{field}={json.dumps(value)}")
    return out


# ----------------------------------------------------------------------------- optional sinks
# W&B and TensorBoard are extras that must never cost the run. Each sink turns its first failure
# into one warning and is not used again; every W&B call that can wait on the network or on
# wandb's service process (init, finish, teardown) runs under a deadline (`_bounded`).

_QUEUE_RECORDS = 1000  # W&B records waiting for the service before we stop sending them
_TEARDOWN_S = 10.0  # wandb's service shutdown after finish; past it the service is killed
_FINISH_GRACE_S = 5.0  # wandb honours finish_timeout itself; our hard stop comes this much later
# An offline init touches no network, only the local service (seconds on a loaded machine): a
# short online deadline must not cost the offline fallback too.
_OFFLINE_INIT_MIN_S = 30.0


def _bounded(fn: Callable[[], Any], timeout_s: float, what: str,
             on_late: Callable[[Any], None] | None = None) -> Any:
    """``fn()`` on a daemon thread: its result, or its exception re-raised, or TimeoutError
    after ``timeout_s``. A call that ends after the deadline hands its result to ``on_late``
    (e.g. to close a W&B run that connected after we gave up on it). The abandoned thread is a
    daemon: it never holds up the exit."""
    lock, box, done = threading.Lock(), {}, threading.Event()

    def target() -> None:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - wandb's teardown may sys.exit
            with lock:
                box["error"] = e
                done.set()
            return
        with lock:
            late = box.get("gave_up", False)
            box["result"] = result
            done.set()
        if late and on_late is not None:
            on_late(result)

    threading.Thread(target=target, name=f"bounded {what}", daemon=True).start()
    done.wait(timeout_s)
    with lock:
        if not done.is_set():
            box["gave_up"] = True
            raise TimeoutError(f"{what} did not finish within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["result"]


def _sync_hint(where: str | None) -> str:
    return f"{where} (sync it with `wandb sync {where}`)" if where else "the run's wandb directory"


class WandbSink:
    """One W&B run; ``start`` returns None when W&B cannot be used at all (one warning)."""

    def __init__(self, wandb: Any, run: Any, finish_timeout_s: float):
        self._wandb = wandb
        self._run = run
        self._finish_timeout_s = finish_timeout_s
        self.sync_dir = _run_sync_dir(run)
        # run.log blocks for good once wandb's service stops reading (a stopped or wedged
        # process): records go through a queue to one worker thread, never from training's.
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE_RECORDS)
        self._error: tuple[int, BaseException] | None = None
        self._worker = threading.Thread(target=self._work, args=(run,), name="W&B log",
                                        daemon=True)
        self._worker.start()

    @classmethod
    def start(cls, cfg: LoggingConfig, run_dir: Path, resolved: dict,
              run_name: str) -> WandbSink | None:
        w = cfg.wandb
        try:
            import wandb  # here, not at the top: importing wandb costs ~1 s of start-up

            settings = wandb.Settings(init_timeout=w.init_timeout_s,
                                      finish_timeout=w.finish_timeout_s)
        except Exception as e:  # noqa: BLE001 - a broken install must not cost the run
            warn(f"logging.wandb.mode={w.mode} but wandb does not load ({_reason(e)}); "
                 "W&B disabled, metrics are in metrics.jsonl")
            return None
        mode = w.mode
        if mode == "online" and not _wandb_has_credentials():
            warn("logging.wandb.mode=online but no W&B credentials found; logging offline "
                 "(sync later with `wandb sync`)")
            mode = "offline"
        wandb_dir = Path(w.dir) if w.dir else run_dir
        try:
            wandb_dir.mkdir(parents=True, exist_ok=True)  # wandb would fall back to /tmp
        except OSError as e:
            warn(f"logging.wandb.dir {wandb_dir} cannot be made ({_reason(e)}); W&B disabled, "
                 "metrics are in metrics.jsonl")
            return None
        # a run on random tokens (data.mock) is tagged: never mistaken for a real one
        tags = list(w.tags) + ([MOCK_TAG] if (resolved.get("data") or {}).get("mock") else [])
        kwargs = dict(
            project=w.project, entity=w.entity, group=w.group, name=w.name or run_name,
            tags=tags or None, config=resolved, dir=str(wandb_dir), resume="allow",
            # create_new: an online attempt abandoned at its deadline may still be connecting
            # while the offline run starts; neither may finish the other.
            reinit="create_new", settings=settings,
        )
        online_error = None
        if mode == "online":
            try:
                run = _bounded(lambda: wandb.init(mode="online", id=_stable_run_id(run_dir),
                                                  **kwargs),
                               w.init_timeout_s, "W&B online init", on_late=_finish_quietly)
                return cls(wandb, run, w.finish_timeout_s)
            except Exception as e:  # noqa: BLE001 - auth, network, server, timeout: all fall back
                online_error = _reason(e)
                _mute_wandb_analytics(wandb)
        return cls._start_offline(wandb, kwargs, run_dir, w.init_timeout_s, w.finish_timeout_s,
                                  online_error)

    @classmethod
    def _start_offline(cls, wandb: Any, kwargs: dict, run_dir: Path, init_timeout_s: float,
                       finish_timeout_s: float,
                       online_error: str | None) -> WandbSink | None:
        # After a failed online attempt the server may hold a half-made run under the stable
        # id: the offline run gets a fresh one, so that syncing it cannot collide with that.
        fresh = uuid.uuid4().hex[:12] if online_error else None
        try:
            run = _bounded(lambda: wandb.init(mode="offline", id=fresh or _stable_run_id(run_dir),
                                              **kwargs),
                           max(init_timeout_s, _OFFLINE_INIT_MIN_S), "W&B offline init",
                           on_late=_finish_quietly)
        except Exception as e:  # noqa: BLE001 - a full disk, a broken service: W&B off
            first = f"online init failed ({online_error}), then offline" if online_error \
                else "offline"
            warn(f"W&B {first} init failed ({_reason(e)}); W&B disabled, "
                 "metrics are in metrics.jsonl")
            _teardown(wandb, kill_first=True)
            return None
        sink = cls(wandb, run, finish_timeout_s)
        if online_error:
            warn(f"W&B online init failed ({online_error}); logging offline to "
                 f"{_sync_hint(sink.sync_dir)}")
        return sink

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._run is None:
            return
        if self._error is not None:
            self._fail(*self._error)
            return
        try:
            self._queue.put_nowait((metrics, step))
        except queue.Full:
            self._fail(step, TimeoutError(f"{_QUEUE_RECORDS} records waiting: its service "
                                          "does not answer"))

    def _work(self, run: Any) -> None:
        while (item := self._queue.get()) is not None:
            metrics, step = item
            try:
                run.log(metrics, step=step)
            except Exception as e:  # noqa: BLE001 - e.g. the service process died
                self._error = (step, e)
                return

    def _fail(self, step: int, e: BaseException) -> None:
        self._run = None
        warn(f"W&B failed at step {step} ({_reason(e)}); training continues without W&B "
             f"(metrics.jsonl has every record; what W&B had is in "
             f"{_sync_hint(self.sync_dir)})")

    def close(self) -> None:
        if self._run is not None and self._error is not None:
            self._fail(*self._error)
        run, self._run = self._run, None
        healthy = run is not None
        if run is not None:
            limit = self._finish_timeout_s + _FINISH_GRACE_S
            try:
                _bounded(lambda: self._drain_and_finish(run), limit, "W&B finish")
            except TimeoutError:
                healthy = False
                warn(f"W&B did not finish within {limit:g} s; what it had not uploaded is in "
                     f"{_sync_hint(self.sync_dir)}")
            except Exception as e:  # noqa: BLE001 - e.g. the service died after the last log
                healthy = False
                warn(f"W&B failed to finish ({_reason(e)}); what it had is in "
                     f"{_sync_hint(self.sync_dir)}")
        _teardown(self._wandb, kill_first=not healthy)

    def _drain_and_finish(self, run: Any) -> None:
        self._queue.put(None)
        self._worker.join()
        if self._error is not None:
            raise self._error[1]
        run.finish()


def _run_sync_dir(run: Any) -> str | None:
    """The run's local directory, which `wandb sync` takes (None if wandb does not say)."""
    try:
        return str(run.settings.sync_dir)
    except Exception:  # noqa: BLE001 - only used in messages
        return None


def _finish_quietly(run: Any) -> None:
    """Close a run that connected after its deadline (it is not used)."""
    try:
        run.finish(exit_code=1)
    except Exception:  # noqa: BLE001 - nothing depends on it
        pass


def _mute_wandb_analytics(wandb: Any) -> None:
    """Stop wandb's usage analytics once the server has failed us: they post to it from an
    atexit hook with their own 10 s timeouts, which against a server that never answers add
    20 s to the exit. (wandb 0.31: ``wandb.analytics.opentelemetry.opentelemetry_proxy``.)"""
    try:
        wandb.analytics.opentelemetry.opentelemetry_proxy.disable()
    except Exception:  # noqa: BLE001 - another wandb version: nothing to mute
        pass


def _teardown(wandb: Any, kill_first: bool) -> None:
    """Shut wandb's service down now, under a deadline, so that its atexit hook (which waits
    for the service without limit, and prints a traceback if the service died) has nothing left
    to do. A service that failed us (``kill_first``) or is still busy at the deadline is killed:
    what it had is on disk already."""
    if kill_first:
        _kill_wandb_service()
    try:
        _bounded(wandb.teardown, _TEARDOWN_S, "W&B teardown")
    except TimeoutError:
        _kill_wandb_service()
    except (Exception, SystemExit):  # noqa: BLE001 - a dead service fails its teardown
        pass


def _kill_wandb_service() -> None:
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name().startswith("wandb-core"):
                child.kill()
        except psutil.Error:  # already gone
            pass


def _stable_run_id(run_dir: Path) -> str:
    """One W&B run per run directory, so a resumed job appends to the same run."""
    id_file = run_dir / "wandb_run_id"
    if id_file.exists():
        return id_file.read_text().strip()
    rid = uuid.uuid4().hex[:12]
    atomic_write(id_file, rid)  # a link there is replaced, never written through
    return rid

