"""The lm-evaluation-harness backend against the harness's own `hf` backend.

Both backends run the same harness tasks, written here (JSON lines and task
YAML files, loaded offline), on one model exported with `save_hf`: ours
reads the directory with the one loader and the Gemma 3 SentencePiece
model, the harness's `hf` backend with transformers (its seq2seq path for
the encoder-decoders) and the same tokenizer as transformers builds it from
the Gemma 3 GGUF. Per request: log-likelihoods within 1e-4 relative,
identical `is_greedy` flags, identical generations; per task: identical
metrics. The models are small random ones with Gemma 3's 262,144-token
vocabulary, so the requests use real tokenization.
"""

import json
import os
import pathlib
import random
import re
import shutil
import socket
import subprocess
import sys

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position
import transformers  # pylint: disable=wrong-import-position

from lm_eval import evaluator  # pylint: disable=wrong-import-position
from lm_eval import tasks as lm_tasks  # pylint: disable=wrong-import-position
from lm_eval.api import registry as lm_registry  # pylint: disable=wrong-import-position
from lm_eval.models.huggingface import HFLM  # pylint: disable=wrong-import-position

from t5x_adapt import assets  # pylint: disable=wrong-import-position
from t5x_adapt import gin_utils  # pylint: disable=wrong-import-position
from t5x_adapt import harness  # pylint: disable=wrong-import-position
from t5x_adapt.convert import hf  # pylint: disable=wrong-import-position
from t5x_adapt.data import sources  # pylint: disable=wrong-import-position
from t5x_adapt.data import vocab as vocab_lib  # pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parent.parent
GEMMA3_VOCAB = 262_144
MAX_LENGTH = 96  # Short enough that the rolling task needs two windows.
BATCH_SIZE = 4

# A multiple-choice task: (question, choices, answer).
_CHOICES = [
    ('The sun rises in the', ['east', 'west', 'sea', 'night'], 0),
    ('Water freezes at zero degrees', ['Celsius', 'Kelvin', 'money'], 0),
    ('A week has seven', ['days', 'years', 'apples'], 0),
    ('The opposite of hot is', ['cold', 'warm', 'loud', 'tall'], 0),
    ('Two plus two is', ['four', 'five', 'three'], 0),
    ('Bees make', ['honey', 'bread', 'iron'], 0),
    ('The capital of France is', ['Paris', 'Rome', 'Berlin', 'Madrid'], 0),
    ('Snow is usually', ['white', 'green', 'purple'], 0),
]
# A generation task: (prompt, answer).
_QUESTIONS = [
    ('Q: What colour is the sky?\nA:', 'blue'),
    ('Q: How many legs has a cat?\nA:', 'four'),
    ('Q: What do cows drink?\nA:', 'water'),
    ('Once upon a time', 'there'),
    ('The quick brown fox', 'jumps'),
]
_PASSAGES = [
    'It was the best of times, it was the worst of times, it was the age '
    'of wisdom, it was the age of foolishness. ' * 4,
    'Call me Ishmael.',
]

_MC_YAML = """
task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""
_GEN_YAML = """
task: tiny_generation
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 10
  do_sample: false
metric_list:
  - metric: exact_match
"""
_ROLLING_YAML = """
task: tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
TASKS = ['tiny_choice', 'tiny_generation', 'tiny_rolling']


def _write_jsonl(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return path


@pytest.fixture(scope='module')
def task_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('harness_tasks')
  data = {
      'choice': _write_jsonl(root / 'choice.jsonl', [
          {'question': q, 'choices': c, 'answer': a} for q, c, a in _CHOICES]),
      'generation': _write_jsonl(root / 'generation.jsonl', [
          {'prompt': p, 'answer': a} for p, a in _QUESTIONS]),
      'rolling': _write_jsonl(root / 'rolling.jsonl', [
          {'text': t} for t in _PASSAGES]),
  }
  (root / 'choice.yaml').write_text(_MC_YAML.format(data=data['choice']))
  (root / 'generation.yaml').write_text(
      _GEN_YAML.format(data=data['generation']))
  (root / 'rolling.yaml').write_text(_ROLLING_YAML.format(data=data['rolling']))
  return root


@pytest.fixture(scope='module')
def gemma3_tokenizer_dir(tmp_path_factory):
  """transformers' Gemma 3 tokenizer (built from the GGUF) and ours."""
  out = tmp_path_factory.mktemp('gemma3_tokenizer')
  tokenizer = transformers.AutoTokenizer.from_pretrained(
      assets.gemma3_270m_dir(), gguf_file=assets.gemma3_270m_gguf().name)
  tokenizer.save_pretrained(out)
  shutil.copy(vocab_lib.gemma3_model_file(), out / 'tokenizer.model')
  return out


def _exported(preset, tmp_path_factory, tokenizer_dir) -> pathlib.Path:
  model = gin_utils.load_model(preset, vocab_size=GEMMA3_VOCAB)
  params = model.get_initial_variables(jax.random.PRNGKey(0))['params']
  out = tmp_path_factory.mktemp(preset)
  hf.save_hf(model, params, out)
  for file in tokenizer_dir.iterdir():
    shutil.copy(file, out / file.name)
  return out


def _evaluate(lm, task_dir):
  return evaluator.simple_evaluate(
      model=lm, tasks=TASKS, log_samples=True, bootstrap_iters=0,
      task_manager=lm_tasks.TaskManager(include_path=str(task_dir)))


def _responses(results, task):
  """Per request of a task, in document order: its filtered response."""
  samples = sorted(results['samples'][task], key=lambda s: s['doc_id'])
  return [sample['filtered_resps'] for sample in samples]


@pytest.fixture(scope='module')
def evaluated(task_dir, gemma3_tokenizer_dir, tmp_path_factory):
  """preset -> (its exported directory, the harness's results through our
  backend, through the `hf` backend), each computed once."""
  done = {}

  def evaluate(preset):
    if preset not in done:
      path = _exported(preset, tmp_path_factory, gemma3_tokenizer_dir)
      ours = harness.HarnessModel.from_checkpoint(
          str(path), batch_size=BATCH_SIZE, max_length=MAX_LENGTH)
      reference = HFLM(pretrained=str(path), batch_size=BATCH_SIZE,
                       max_length=MAX_LENGTH, dtype='float32', device='cpu')
      assert ours.backend == reference.backend
      done[preset] = (path, _evaluate(ours, task_dir),
                      _evaluate(reference, task_dir))
    return done[preset]

  return evaluate


@pytest.mark.parametrize('preset', [
    'gemma3_tiny', 't5gemma_tiny',
    pytest.param('t5gemma2_tiny', marks=pytest.mark.slow)])
def test_results_equal_the_hf_backend(preset, evaluated):
  _, got, expected = evaluated(preset)
  assert lm_registry.get_model('t5x_adapt') is harness.HarnessModel

  # Multiple choice: (log-likelihood, is_greedy) of every choice.
  ll_got = [r for doc in _responses(got, 'tiny_choice') for r in doc]
  ll_expected = [r for doc in _responses(expected, 'tiny_choice') for r in doc]
  values = np.array([[g[0], e[0]] for g, e in zip(ll_got, ll_expected)])
  error = np.max(np.abs(values[:, 0] - values[:, 1]) / np.abs(values[:, 1]))
  print(f'{preset}: {len(values)} choices, max relative log-likelihood '
        f'error {error:.2e}')
  assert len(ll_got) == len(ll_expected) == sum(len(c) for _, c, _ in
                                                _CHOICES)
  assert error < 1e-4
  assert [bool(g[1]) for g in ll_got] == [bool(e[1]) for e in ll_expected]

  # Rolling log-likelihoods of whole passages (two windows for the first).
  rolling = np.array([_responses(r, 'tiny_rolling') for r in (got, expected)],
                     np.float64)
  np.testing.assert_allclose(rolling[0], rolling[1], rtol=1e-4)

  # Generations: the same text.
  generated = _responses(got, 'tiny_generation')
  assert generated == _responses(expected, 'tiny_generation')
  print(f'{preset}: generations {generated}')

  # Every task metric.
  for task in TASKS:
    for name, value in expected['results'][task].items():
      if isinstance(value, float):
        assert got['results'][task][name] == pytest.approx(value, rel=1e-4), (
            task, name)


def _command(path, task_dir, out, *flags):
  return [sys.executable, '-m', 't5x_adapt.harness',
          '--gin_file=gin/runs/harness.gin',
          f'--gin.CHECKPOINT_PATH="{path}"', "--gin.TASKS=['tiny_choice']",
          f'--gin.INCLUDE_PATH="{task_dir}"', f'--gin.OUTPUT_DIR="{out}"',
          '--gin.BATCH_SIZE=8', f'--gin.MAX_LENGTH={MAX_LENGTH}', *flags]


def _env(devices: int) -> dict:
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def _choice_responses(out: pathlib.Path) -> list:
  samples = [json.loads(line) for line in
             (out / 'samples_tiny_choice.jsonl').read_text().splitlines()]
  return [s['filtered_resps'] for s in sorted(samples,
                                              key=lambda s: s['doc_id'])]


def _assert_same_responses(got, expected):
  assert len(got) == len(expected) == len(_CHOICES)
  for doc_got, doc_expected in zip(got, expected):
    for (ll, greedy), (ll_expected, greedy_expected) in zip(doc_got,
                                                            doc_expected):
      assert float(ll) == pytest.approx(float(ll_expected), rel=1e-5)
      assert greedy == greedy_expected


@pytest.fixture(scope='module')
def one_device_responses(evaluated):
  """gemma3_tiny's directory and its per-request results on one device."""
  path, ours, _ = evaluated('gemma3_tiny')
  return path, _responses(ours, 'tiny_choice')


def test_eight_devices_give_one_devices_results(one_device_responses,
                                                task_dir, tmp_path):
  """`python -m t5x_adapt.harness` on a data x fsdp mesh of 8 devices
  (batches of 8) gives the in-process backend's results on one (batches of
  4), and writes the harness's files."""
  path, expected = one_device_responses
  result = subprocess.run(
      _command(path, task_dir, tmp_path, '--gin.DATA_PARALLELISM=4',
               '--gin.FSDP_PARALLELISM=2'),
      cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'tiny_choice: acc' in result.stderr
  results = json.loads((tmp_path / 'results.json').read_text())
  assert set(results['results']['tiny_choice']) >= {'acc,none',
                                                     'acc_norm,none'}
  _assert_same_responses(_choice_responses(tmp_path), expected)


@pytest.mark.slow
def test_two_processes_give_one_processs_results(one_device_responses,
                                                  task_dir, tmp_path):
  """2 processes x 2 devices (jax.distributed): the same results, written
  by process 0 alone."""
  path, expected = one_device_responses
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    address = '127.0.0.1:%d' % sock.getsockname()[1]
  processes = [subprocess.Popen(
      _command(path, task_dir, tmp_path / str(index),
               '--gin.DATA_PARALLELISM=2', '--gin.FSDP_PARALLELISM=2',
               f'--coordinator_address={address}', '--num_processes=2',
               f'--process_id={index}'),
      cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for index in range(2)]
  outputs = [process.communicate(timeout=600) for process in processes]
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-3000:]
  assert not (tmp_path / '1' / 'results.json').exists()
  _assert_same_responses(_choice_responses(tmp_path / '0'), expected)


# ------------------------------------------------ the real Gemma 3 270M --

NEXT_SENTENCE_ITEMS = 200
NEXT_SENTENCE_CHOICES = 4


def _next_sentence_items(count: int, choices: int, seed: int = 0):
  """Next-sentence choice from the corpus validation split: a sentence,
  the one after it and `choices - 1` sentences from elsewhere."""
  sentences = []
  for document in sources.corpus_text('validation'):
    text = ' '.join(document.split())
    sentences.append([s for s in re.split(r'(?<=[.!?]) ', text)
                      if 40 <= len(s) <= 200])
  pairs = [(doc[i], doc[i + 1]) for doc in sentences
           for i in range(len(doc) - 1)]
  everything = [s for doc in sentences for s in doc]
  rng = random.Random(seed)
  items = []
  for context, follower in rng.sample(pairs, count):
    options = [follower] + rng.sample(
        [s for s in everything if s != follower], choices - 1)
    rng.shuffle(options)
    items.append({'context': context, 'choices': options,
                  'answer': options.index(follower)})
  return items


_NEXT_SENTENCE_YAML = """
task: next_sentence
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_gemma3_270m_next_sentence_accuracy_equals_the_hf_backend(tmp_path):
  data = _write_jsonl(tmp_path / 'next_sentence.jsonl', _next_sentence_items(
      NEXT_SENTENCE_ITEMS, NEXT_SENTENCE_CHOICES))
  (tmp_path / 'next_sentence.yaml').write_text(
      _NEXT_SENTENCE_YAML.format(data=data))
  gguf = assets.gemma3_270m_gguf()
  ours = harness.HarnessModel.from_checkpoint(str(gguf), batch_size=8,
                                              max_length=512)
  reference = HFLM(pretrained=str(gguf.parent), gguf_file=gguf.name,
                   batch_size=8, max_length=512, dtype='float32',
                   device='cpu')
  results = [evaluator.simple_evaluate(
      model=lm, tasks=['next_sentence'], log_samples=True, bootstrap_iters=0,
      task_manager=lm_tasks.TaskManager(include_path=str(tmp_path)))
             for lm in (ours, reference)]
  accuracy = [r['results']['next_sentence']['acc,none'] for r in results]
  ll = np.array([[c[0] for doc in _responses(r, 'next_sentence') for c in doc]
                 for r in results], np.float64)
  error = np.max(np.abs(ll[0] - ll[1]) / np.abs(ll[1]))
  print(f'Gemma 3 270M, next-sentence choice ({NEXT_SENTENCE_ITEMS} items, '
        f'{NEXT_SENTENCE_CHOICES} choices): accuracy {accuracy[0]:.3f} '
        f'(t5x_adapt) vs {accuracy[1]:.3f} (hf); max relative '
        f'log-likelihood error {error:.2e}')
  assert accuracy[0] == accuracy[1]
  # Chance is 0.25; two standard errors above it at 200 items is 0.31.
  assert accuracy[0] > 1.2 / NEXT_SENTENCE_CHOICES
