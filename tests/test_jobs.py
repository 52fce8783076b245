"""Jobs that wait for each other, in this process or in workers (jobs.py)."""

import os
import pathlib
import time

import pytest

from t5x_adapt.experiments import jobs


def _write(path: str, text: str, seconds: float = 0.0) -> dict:
  time.sleep(seconds)
  pathlib.Path(path).write_text(text)
  return {'pid': os.getpid(), 'wrote': text}


def _read(path: str) -> dict:
  return {'pid': os.getpid(), 'read': pathlib.Path(path).read_text()}


def _environment(name: str) -> dict:
  return {'pid': os.getpid(), 'value': os.environ.get(name)}


def _fail(message: str) -> None:
  raise RuntimeError(message)


def _graph(tmp_path):
  """b waits for a (slow), c for nothing: run at once, c would finish first
  and b would find no file if it did not wait."""
  first = str(tmp_path / 'a.txt')
  return [jobs.Job('a', _write, (first, 'from a', 0.5)),
          jobs.Job('c', _write, (str(tmp_path / 'c.txt'), 'from c')),
          jobs.Job('b', _read, (first,), after=('a',))]


@pytest.mark.parametrize('workers', [1, 2])
def test_a_job_starts_after_the_ones_it_waits_for(tmp_path, workers):
  results = jobs.run(_graph(tmp_path), workers)
  assert list(results) == ['a', 'c', 'b']  # The listed order.
  assert results['b']['read'] == 'from a'
  pids = {r['pid'] for r in results.values()}
  if workers == 1:
    assert pids == {os.getpid()}
  else:
    assert os.getpid() not in pids and len(pids) == 2


def test_the_worker_environment_reaches_the_workers_alone():
  name = 'T5X_ADAPT_TEST_JOBS_VARIABLE'
  assert name not in os.environ
  results = jobs.run([jobs.Job(k, _environment, (name,)) for k in 'xy'], 2,
                     worker_env={name: 'set'})
  assert [r['value'] for r in results.values()] == ['set', 'set']
  assert name not in os.environ


@pytest.mark.parametrize('workers', [1, 2])
def test_a_failing_job_raises_its_error(tmp_path, workers):
  graph = [jobs.Job('ok', _write, (str(tmp_path / 'ok.txt'), 'ok')),
           jobs.Job('bad', _fail, ('job bad failed',)),
           jobs.Job('never', _read, (str(tmp_path / 'ok.txt'),),
                    after=('bad',))]
  with pytest.raises(RuntimeError, match='job bad failed'):
    jobs.run(graph, workers)


def test_jobs_out_of_order_are_refused(tmp_path):
  a, c, b = _graph(tmp_path)
  with pytest.raises(ValueError, match=r"job 'b' comes after \['a'\]"):
    jobs.run([b, a, c])
  with pytest.raises(ValueError, match="job 'a' is listed twice"):
    jobs.run([a, a])
  with pytest.raises(ValueError, match='workers=0'):
    jobs.run([a], 0)
