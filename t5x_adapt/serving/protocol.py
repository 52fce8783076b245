"""The OpenAI-compatible API's requests and responses (pydantic models).

Requests forbid unknown fields, so a misspelt or unsupported parameter is a
400 naming it rather than a silent default. Besides OpenAI's fields, `top_k`
and `ignore_eos` are accepted (as vLLM does).
"""

from __future__ import annotations

import time
from typing import Literal, Optional, Union

import pydantic

from t5x_adapt.serving.engine import SamplingParams


class _Request(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra='forbid')


class _Sampled(_Request):
  """The sampling and stopping fields both generation endpoints share."""

  model: Optional[str] = None
  max_tokens: Optional[int] = None
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  stop: Union[str, list[str], None] = None
  seed: Optional[int] = None
  stream: bool = False
  stream_options: Optional[dict] = None
  n: int = 1
  ignore_eos: bool = False
  user: Optional[str] = None

  def sampling(self, default_max_tokens: int) -> SamplingParams:
    stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
    max_tokens = self.max_tokens
    if max_tokens is None:
      max_tokens = default_max_tokens
    return SamplingParams(max_tokens=max_tokens,
                          temperature=self.temperature, top_k=self.top_k,
                          top_p=self.top_p, seed=self.seed, stop=tuple(stop),
                          ignore_eos=self.ignore_eos)

  @property
  def include_usage(self) -> bool:
    return bool((self.stream_options or {}).get('include_usage'))


class CompletionRequest(_Sampled):
  """POST /v1/completions: a prompt (text or token ids)."""

  prompt: Union[str, list[int]]


class ChatMessage(_Request):
  role: str
  content: str


class ChatRequest(_Sampled):
  """POST /v1/chat/completions: messages in Gemma's turn template."""

  messages: list[ChatMessage]
  max_completion_tokens: Optional[int] = None

  def sampling(self, default_max_tokens: int) -> SamplingParams:
    if self.max_tokens is None and self.max_completion_tokens is not None:
      self.max_tokens = self.max_completion_tokens
    return super().sampling(default_max_tokens)


class EmbeddingRequest(_Request):
  """POST /v1/embeddings: texts (or token ids), one vector each."""

  input: Union[str, list[str], list[int], list[list[int]]]
  model: Optional[str] = None
  encoding_format: Literal['float', 'base64'] = 'float'
  user: Optional[str] = None


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {'prompt_tokens': prompt_tokens,
          'completion_tokens': completion_tokens,
          'total_tokens': prompt_tokens + completion_tokens}


def completion(request_id: str, model: str, text: str,
               finish_reason: Optional[str], chat: bool,
               usage_: Optional[dict] = None, chunk: bool = False) -> dict:
  """A (chat) completion, or one streamed chunk of it."""
  if chat:
    # A stream names the role in its first chunk only (OpenAI's format).
    message = {'content': text} if chunk else {'role': 'assistant',
                                               'content': text}
    choice = {'index': 0, 'delta' if chunk else 'message': message,
              'finish_reason': finish_reason}
    kind = 'chat.completion.chunk' if chunk else 'chat.completion'
  else:
    choice = {'index': 0, 'text': text, 'logprobs': None,
              'finish_reason': finish_reason}
    kind = 'text_completion'
  body = {'id': request_id, 'object': kind, 'created': int(time.time()),
          'model': model, 'choices': [choice]}
  if usage_ is not None:
    body['usage'] = usage_
  return body


def error(message: str, param: Optional[str], status: int) -> dict:
  """OpenAI's error body."""
  kind = {400: 'invalid_request_error', 404: 'not_found_error',
          429: 'rate_limit_error', 503: 'service_unavailable'}.get(
              status, 'server_error')
  return {'error': {'message': message, 'type': kind, 'param': param,
                    'code': status}}
