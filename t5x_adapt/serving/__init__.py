"""Serving: a continuous-batching engine and its OpenAI-compatible server.

  engine.py    Engine: decode slots, admission, stop conditions; the Python
               API `Engine.generate`
  protocol.py  the API's request and response bodies
  server.py    the FastAPI app (`Server`), the engine's thread, metrics

`python -m t5x_adapt.serve` (t5x_adapt/serve.py) puts them together.
"""
