"""Experiments that reproduce the paper's findings at small scale.

  python -m t5x_adapt.experiments.paper [--quick]   (gin/experiments/)
"""
