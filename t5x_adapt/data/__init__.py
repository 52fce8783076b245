"""Data: offline corpora and tasks (`sources`), vocabularies and objectives.

Submodules are imported on their own (`from t5x_adapt.data import sources`):
importing this package loads nothing, so a cached `sources.prepare()` stays
fast and does not pull in TensorFlow.
"""
