"""Jobs that depend on each other, run in this process or in worker processes.

An experiment grid is a small graph: the fine-tuning runs of a model wait for
its adaptation, which waits for the sources, and otherwise the runs do not
depend on each other. `run` starts each job once the jobs it comes after
have finished, in at most `workers` processes at a time:

  results = jobs.run([Job('a', f, (1,)), Job('b', g, (2,), after=('a',))],
                     workers=2)

With one worker every job runs here, in list order (which must put each job
after the ones it waits for). With more, the workers are spawned processes
(fresh interpreters: JAX and gin state are not forked), each job a call of a
module-level function; its arguments and its result are pickled. The results
do not depend on the number of workers, only the time does.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Job:
  """`fn(*args)`, started when every job in `after` has finished.

  Attributes:
    key: Names the job (and its result).
    fn: A module-level function (workers import it by name).
    args: Its arguments (picklable).
    after: Keys of the jobs it waits for.
  """
  key: Hashable
  fn: Callable[..., Any]
  args: tuple = ()
  after: tuple = ()


def _check_order(jobs: Sequence[Job]) -> None:
  seen = set()
  for job in jobs:
    missing = [key for key in job.after if key not in seen]
    if missing:
      raise ValueError(f'job {job.key!r} comes after {missing!r}, which are '
                       'not listed before it')
    if job.key in seen:
      raise ValueError(f'job {job.key!r} is listed twice')
    seen.add(job.key)


def run(jobs: Sequence[Job], workers: int = 1,
        initializer: Optional[Callable[..., None]] = None,
        initargs: tuple = (),
        worker_env: Optional[Mapping[str, str]] = None
        ) -> dict[Hashable, Any]:
  """Runs every job; returns {key: result}.

  Args:
    jobs: In an order that puts each job after the ones it waits for.
    workers: Processes running jobs at once; 1 runs them here.
    initializer: Called with `initargs` once in each process before its
      first job (here too, with one worker).
    initargs: Its arguments (with workers, passed to the processes when they
      start, so they may hold shared `multiprocessing` values).
    worker_env: Environment variables set in the worker processes alone
      (from their start: read at import time, e.g. by tqdm, they apply).

  Raises:
    ValueError: `jobs` out of order, or `workers` < 1.
    Whatever a job raised (the jobs running then finish first).
  """
  _check_order(jobs)
  if workers < 1:
    raise ValueError(f'workers={workers}: at least 1')
  if workers == 1:
    if initializer is not None:
      initializer(*initargs)
    return {job.key: job.fn(*job.args) for job in jobs}
  with _environment(worker_env or {}):
    return _run_in_pool(jobs, workers, initializer, initargs)


@contextlib.contextmanager
def _environment(variables: Mapping[str, str]):
  """`variables` in os.environ (so in processes started meanwhile), then
  the environment as it was."""
  before = {name: os.environ.get(name) for name in variables}
  os.environ.update(variables)
  try:
    yield
  finally:
    for name, value in before.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


def _run_in_pool(jobs, workers, initializer, initargs):
  done: dict[Hashable, Any] = {}
  running: dict[concurrent.futures.Future, Hashable] = {}
  waiting = list(jobs)
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context('spawn'),
      initializer=initializer, initargs=initargs) as pool:
    while waiting or running:
      # Only as many jobs as workers are handed over, so that a job that
      # becomes ready later can still go before one listed after it.
      ready = [job for job in waiting if all(k in done for k in job.after)]
      for job in ready[:workers - len(running)]:
        waiting.remove(job)
        running[pool.submit(job.fn, *job.args)] = job.key
      finished, _ = concurrent.futures.wait(
          running, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in finished:
        key = running.pop(future)
        try:
          done[key] = future.result()
        except BaseException:
          for other in running:
            other.cancel()
          raise
  return {job.key: done[job.key] for job in jobs}
