"""The hooks around the MLflow run that kedro-mlflow opens for ``kedro run``: its tags
(environment, the error that failed it), one nested run per cross-validation fold, and the
status KILLED when Ctrl-C or SIGTERM stops the run. Registered through ``hooks.py``."""

from __future__ import annotations

import atexit
import gc
import logging
import platform
import signal
import subprocess
import threading

from kedro.framework.hooks import hook_impl
from kedro.pipeline import Node, Pipeline

from pneumonia_kedro.pipelines.folds import fold_of

logger = logging.getLogger(__name__)


class MlflowRunTagsHook:
    """Tags the run's MLflow run with the git commit, the Kedro environment and the machine,
    and with the error that failed it.

    Kedro calls ``on_node_error`` only around ``node.run``, which for a generator node (the
    cache builds, the SRs) covers its first chunk: an error in a later chunk reaches only
    ``on_pipeline_error``, which gets the node that was running from ``before_node_run``.
    """

    def __init__(self) -> None:
        self._tagged_run: str | None = None
        self._running: str | None = None  # the last node started
        self._error_tagged = False

    @hook_impl
    def before_pipeline_run(self) -> None:
        self._running, self._error_tagged = None, False

    @hook_impl
    def before_node_run(self, node: Node) -> None:
        import mlflow

        self._running = node.name
        run = mlflow.active_run()
        if run is None or run.info.run_id == self._tagged_run:
            return
        self._tagged_run = run.info.run_id
        mlflow.set_tags(environment_tags())

    @hook_impl
    def on_node_error(self, error: Exception, node: Node) -> None:
        """Keep the error with the run; kedro-mlflow then ends it with status FAILED."""
        self._tag_error(error, node.name)

    @hook_impl(tryfirst=True)
    def on_pipeline_error(self, error: Exception) -> None:
        """An error no ``on_node_error`` saw (a generator node's later chunk)."""
        if not self._error_tagged and self._running is not None:
            self._tag_error(error, self._running)

    def _tag_error(self, error: Exception, node_name: str) -> None:
        import mlflow

        if mlflow.active_run() is None:
            return
        # MLflow caps tag values; the start of the message names the file and the problem.
        mlflow.set_tags({"error.node": node_name,
                         "error.message": f"{type(error).__name__}: {error}"[:4000]})
        self._error_tagged = True


class FoldRunsHook:
    """One nested MLflow run per cross-validation fold (``fold_0`` ...) under the run
    kedro-mlflow opens for ``kedro run``: a fold's nodes log their parameters, curves,
    metrics and artefacts there; the parent keeps the out-of-fold and ensemble metrics.

    A fold's child run is made when its first node starts (a run stopped before a fold
    began has no run for it), under a lock, so that nodes running side by side
    (``--runner ThreadRunner``) share it. A fold's node enters its child run after
    kedro-mlflow has re-entered the parent (``trylast``); the next node leaves it first
    (``ender``, ``tryfirst``), so that its parameters go to the parent. Leaving ends the
    child FINISHED only once all the fold's nodes are done; until then it stays RUNNING, so
    that an interruption ends it KILLED and an error FAILED.
    """

    def __init__(self) -> None:
        self.children: dict[str, str] = {}
        self.ender = _FoldRunEnder(self)
        self._parent: tuple[str, str] | None = None  # experiment id, run id
        self._left: dict[str, int] = {}  # nodes of each fold not yet done
        self._lock = threading.Lock()

    @hook_impl(trylast=True)
    def before_pipeline_run(self, pipeline: Pipeline) -> None:
        import mlflow

        run = mlflow.active_run()
        self._parent = None if run is None else (run.info.experiment_id, run.info.run_id)
        self.children = {}
        self._left = {}
        for node in pipeline.nodes:
            if (fold := fold_of(node.namespace)) is not None:
                self._left[fold] = self._left.get(fold, 0) + 1

    def child_run(self, fold: str) -> str | None:
        """The fold's child run, made when its first node starts."""
        import mlflow

        if self._parent is None or fold not in self._left:
            return None
        with self._lock:
            if fold not in self.children:
                experiment, parent = self._parent
                self.children[fold] = mlflow.MlflowClient().create_run(
                    experiment, run_name=fold,
                    tags={"mlflow.parentRunId": parent, "fold": fold}).info.run_id
            return self.children[fold]

    @hook_impl(trylast=True)
    def before_node_run(self, node: Node, inputs: dict) -> None:
        import mlflow
        from kedro_mlflow.framework.hooks import mlflow_hook
        from kedro_mlflow.framework.hooks.utils import _flatten_dict

        fold = fold_of(node.namespace)
        if fold is None or mlflow.active_run() is None:
            return
        child = self.child_run(fold)
        if child is None:
            return
        mlflow.start_run(run_id=child, nested=True)
        # The node's parameters, as kedro-mlflow logs them in the parent (mlflow.yml).
        params = {name.removeprefix("params:"): value for name, value in inputs.items()
                  if name.startswith("params:")}
        if mlflow_hook.flatten:
            params = _flatten_dict(params, recursive=mlflow_hook.recursive, sep=mlflow_hook.sep)
        for name, value in params.items():
            mlflow_hook._log_param(mlflow_hook.sanitize_param_name(name), value)

    @hook_impl
    def after_node_run(self, node: Node) -> None:
        fold = fold_of(node.namespace)
        with self._lock:
            if fold in self._left:
                self._left[fold] -= 1

    def leave_fold_run(self) -> None:
        import mlflow

        run = mlflow.active_run()
        if run is None or run.info.run_id not in self.children.values():
            return
        fold = next(f for f, child in self.children.items() if child == run.info.run_id)
        mlflow.end_run()
        if self._left.get(fold, 0) > 0:  # left between two of its nodes: not finished
            mlflow.MlflowClient().update_run(run.info.run_id, status="RUNNING")

    def end_fold_runs(self, status: str) -> None:
        import mlflow

        self.leave_fold_run()
        client = mlflow.MlflowClient()
        for child in self.children.values():
            if client.get_run(child).info.status == "RUNNING":
                client.set_terminated(child, status)
        self.children = {}


class _FoldRunEnder:
    """The ``tryfirst`` half of ``FoldRunsHook`` (one object holds one implementation of
    each hook)."""

    def __init__(self, owner: FoldRunsHook) -> None:
        self.owner = owner

    @hook_impl(tryfirst=True)
    def before_node_run(self) -> None:
        self.owner.leave_fold_run()

    @hook_impl(tryfirst=True)
    def after_pipeline_run(self) -> None:
        self.owner.end_fold_runs("FINISHED")

    @hook_impl(tryfirst=True)
    def on_pipeline_error(self) -> None:
        self.owner.end_fold_runs("FAILED")


class InterruptedRunHook:
    """Marks the MLflow runs KILLED (tag ``interrupted``) when Ctrl-C or SIGTERM stops
    ``kedro run``; the next run resumes from the last checkpoint (``train.resume``).

    Kedro hands only ``Exception`` to ``on_pipeline_error``: without this, MLflow's exit
    handler closed an interrupted run as FINISHED, with a partial curve that looked complete.
    The runs are marked at exit, once the stack has unwound. A signal that lands inside an
    SQLite write leaves that write's connection holding the database lock until the
    connection is collected, so a garbage collection comes first.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @hook_impl
    def before_pipeline_run(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signals arrive there
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self.interrupted)

    def interrupted(self, signum: int, frame: object) -> None:
        if self.signal_name is None:
            # Runs before MLflow's own exit handler (atexit runs the last registered first).
            atexit.register(self.end_runs_killed)
        self.signal_name = signal.Signals(signum).name
        self._restore()  # a second Ctrl-C stops at once
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def end_runs_killed(self) -> None:
        """Every active run, and its child runs still RUNNING (folds), ends KILLED."""
        import mlflow

        gc.collect()  # the interrupted write's connection: its lock goes with it
        client = mlflow.MlflowClient()
        while (run := mlflow.active_run()) is not None:
            try:  # the marks are best effort; the status below is what must land
                children = client.search_runs(
                    [run.info.experiment_id], "attributes.status = 'RUNNING' and "
                    f"tags.mlflow.parentRunId = '{run.info.run_id}'")
                for child in children:
                    client.set_tag(child.info.run_id, "interrupted", self.signal_name)
                    client.set_terminated(child.info.run_id, "KILLED")
                mlflow.set_tag("interrupted", self.signal_name)
            except Exception:  # MLflow's own exit handler would end it FINISHED
                logger.exception("could not tag the interrupted MLflow run %s", run.info.run_id)
            finally:
                mlflow.end_run(status="KILLED")

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._restore()

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def _git(*args: str) -> str:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip()


def environment_tags() -> dict[str, str]:
    """Git commit and state, Python, torch and the device the run can use."""
    import torch

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": str(bool(status) and status != "unknown").lower(),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
