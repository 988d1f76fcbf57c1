"""How the processes of a command start and stop.

A command that runs a flow with no ``PREFECT_API_URL`` needs a Prefect API: Prefect starts a
local, ephemeral one as a child process (``SubprocessASGIServer``) and stops it at exit. A
command killed outright (``kill -9``, the OOM killer, a lost terminal) runs no exit handler,
and that server would live on. :func:`start_local_api` starts the same server itself, from the
main thread, before the flow, so that it:

* dies with the command, whatever ends it: on Linux the kernel sends it SIGKILL when its
  parent dies (``prctl(PR_SET_PDEATHSIG)``, set between fork and exec);
* does not get the terminal's Ctrl-C: it runs in a session of its own, so that an
  interrupted command can still record its runs' ends (and ``emdask serve`` pause its
  schedules) before it stops the server at exit;
* serves the processes the command starts too (``PREFECT_API_URL`` is set for them): the
  flow runs of ``emdask serve`` would otherwise each start an unguarded server of their own.

Where the kernel offers no parent-death signal (macOS, Windows), Prefect starts and stops its
server as it always does.

The server is given time to start on a loaded machine: Prefect's setting
``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` defaults to :data:`STARTUP_TIMEOUT`
seconds here (Prefect's own default is 20); the environment overrides it.

The flow runs ``emdask serve`` starts are processes of their own (Prefect's runner spawns
them), each with the Dask cluster of its run. :func:`serving` marks the serving process in the
environment those runs inherit, and :func:`die_with_server`, called when a run's process
imports :mod:`pipelines`, has it watch its parent: once ``emdask serve`` is gone, even killed
with SIGKILL, the run kills its own children and itself within a second, rather than running
on without the API that records it.

Dask worker processes of a local cluster die with their parent already (a pipe they watch);
:func:`sigint_ignored` keeps the terminal's Ctrl-C from them too: the flow process stops the
cluster when it is interrupted, and :func:`signals_deferred` keeps a second signal (the
SIGTERM Prefect's runner sends its flow runs as it stops) from cutting that short.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

__all__ = [
    "STARTUP_TIMEOUT",
    "STARTUP_TIMEOUT_ENV",
    "LocalApiError",
    "child_guard",
    "configure_environment",
    "die_with_server",
    "serving",
    "signals_deferred",
    "sigint_ignored",
    "start_local_api",
]

#: Prefect's setting for the seconds the ephemeral API may take to start.
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
#: Its default here: a loaded 2-core machine takes well over Prefect's 20 s.
STARTUP_TIMEOUT = 180

_PR_SET_PDEATHSIG = 1
#: Set by 'emdask serve' in its environment: its process id, which the flow runs it starts watch.
SERVE_PID_ENV = "EMDASK_SERVE_PID"
#: Seconds between two looks of a served flow run at its parent.
WATCH_INTERVAL = 0.25


class LocalApiError(RuntimeError):
    """The local Prefect API did not start."""


def configure_environment():
    """Defaults of the environment a command runs in (set before Prefect is imported; the
    environment overrides them)."""
    # no usage data leaves the machine from a local ephemeral API
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault(STARTUP_TIMEOUT_ENV, str(STARTUP_TIMEOUT))


def _prctl():
    """libc's ``prctl`` on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def child_guard():
    """A ``preexec_fn`` making a child process get SIGKILL when this process dies, or None
    where the kernel cannot do that.

    The signal is tied to the thread that starts the child: start it from the main thread.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def die_with_parent():  # runs in the child, between fork and exec
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the guard was in place
            os._exit(1)

    return die_with_parent


class _GuardedSubprocess:
    """The ``subprocess`` module as Prefect's server module sees it while it starts the server:
    ``Popen`` starts the child in a session of its own, guarded by ``preexec_fn``."""

    def __init__(self, real, preexec_fn):
        self._real = real
        self._preexec_fn = preexec_fn

    def __getattr__(self, name):
        return getattr(self._real, name)

    def Popen(self, *args, **kwargs):  # noqa: N802 - the name Prefect calls
        kwargs.setdefault("preexec_fn", self._preexec_fn)
        kwargs.setdefault("start_new_session", True)
        return self._real.Popen(*args, **kwargs)


def _api_configured():
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    return bool(PREFECT_API_URL.value()) or not PREFECT_SERVER_EPHEMERAL_ENABLED.value()


def _startup_timeout():
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    text = os.environ.get(STARTUP_TIMEOUT_ENV)
    try:
        return max(1, int(float(text))) if text else PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    except ValueError:
        return PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()


def start_local_api():
    """Start the local ephemeral Prefect API the flows of this process will use, guarded.

    Nothing is started when ``PREFECT_API_URL`` names an API, when ephemeral APIs are off, off
    the main thread, or where no guard is available (Prefect then starts its server itself,
    as usual). Prefect stops the server at exit.

    Returns
    -------
    str or None
        The API's URL, when this call started it (or found it started).

    Raises
    ------
    LocalApiError
        The server did not answer within the startup timeout.
    """
    if _api_configured() or threading.current_thread() is not threading.main_thread():
        return None
    guard = child_guard()
    if guard is None:
        return None
    from prefect.server.api import server as server_module

    base = server_module.SubprocessASGIServer
    current = base._instances.get(None)
    if current is not None and current.running:
        return _share(current.api_url)
    base._instances.pop(None, None)

    class GuardedServer(base):
        """Prefect's ephemeral API server, started in its own session and killed with us."""

        def _run_uvicorn_command(self):
            real = server_module.subprocess
            server_module.subprocess = _GuardedSubprocess(real, guard)
            try:
                return super()._run_uvicorn_command()
            finally:
                server_module.subprocess = real

    with contextlib.suppress(Exception):  # Prefect's console log says where the API listens
        from prefect.logging.configuration import ensure_logging_setup

        ensure_logging_setup()
    server = GuardedServer()  # registered as the default server every Prefect client finds
    timeout = _startup_timeout()
    try:
        server.start(timeout=timeout)
    except Exception as exc:
        with contextlib.suppress(Exception):
            server.stop()
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LocalApiError(
            f"the local Prefect API did not start ({first[:200]}); if it needs more than "
            f"{timeout} s on this machine, set {STARTUP_TIMEOUT_ENV} higher, or set "
            "PREFECT_API_URL to a running Prefect server"
        ) from exc
    return _share(server.api_url)


def _share(url):
    """Processes this one starts (the flow runs of 'emdask serve') use the API at ``url``
    rather than each starting an unguarded one of its own."""
    os.environ["PREFECT_API_URL"] = url
    return url


@contextlib.contextmanager
def sigint_ignored():
    """SIGINT ignored while the block runs (in the main thread; elsewhere a no-op).

    Processes started meanwhile keep ignoring it (a disposition to ignore survives exec, and a
    Python process started so raises no KeyboardInterrupt): the terminal's Ctrl-C leaves them
    to their parent, which stops them. Keep the block short: a Ctrl-C that arrives during it
    is lost.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (ValueError, OSError):  # no signals here (an embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def signals_deferred(signums=(signal.SIGINT, signal.SIGTERM)):
    """SIGINT and SIGTERM held back while the block runs (a clean-up that must finish), then
    delivered (in the main thread; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {}
    for signum in signums:
        try:
            previous[signum] = signal.signal(signum, lambda number, frame: received.append(number))
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


def serving():
    """Mark this process as the one serving deployments: the flow-run processes it starts
    inherit the mark and die with it (:func:`die_with_server`)."""
    os.environ[SERVE_PID_ENV] = str(os.getpid())


def _kill_tree():
    """SIGKILL this process's descendants, then this process."""
    with contextlib.suppress(Exception):
        import psutil

        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_server():
    """In a flow-run process started by 'emdask serve': watch the server from a daemon thread,
    and end this process (and its children) once the server is gone. Elsewhere, nothing.

    Returns
    -------
    bool
        Whether this process watches a server.
    """
    text = os.environ.get(SERVE_PID_ENV)
    if not text or not text.isdigit() or int(text) == os.getpid():
        return False
    server = int(text)
    if os.getppid() != server:
        try:  # a process of a run (a Dask worker), or a run whose server died already
            os.kill(server, 0)
        except ProcessLookupError:
            _kill_tree()
        except PermissionError:
            pass
        return False
    parent = os.getppid()

    def watch():
        import time

        while os.getppid() == parent:
            time.sleep(WATCH_INTERVAL)
        _kill_tree()

    threading.Thread(target=watch, name="die-with-server", daemon=True).start()
    return True
