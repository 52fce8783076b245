"""Serving: the continuous-batching engine and its OpenAI-compatible server.

  engine.py   Engine (decode slots, admission, stop conditions), the Python
              API `Engine.generate`
"""
