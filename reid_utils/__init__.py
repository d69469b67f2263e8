"""Helpers for the person re-identification tutorial series.

One module per stage of the pipeline, in the order the notebooks teach them:
``synthetic`` (an embedded Market-format data set), ``data`` (names, transforms,
loaders), ``prepare`` (Market-1501 -> ImageFolder), ``model``, ``train``.
"""

__version__ = "0.1.0"
