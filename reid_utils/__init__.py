"""Helpers for the person re-identification tutorial series.

One module per stage, in the order the notebooks teach them: ``synthetic`` (an embedded
Market-format data set), ``data`` (names, finding the data, transforms, loaders), ``prepare``
(Market-1501 -> ImageFolder), ``model``, ``train`` (the loop, checkpoints, the CLI), ``test``
(features), ``metrics`` (CMC / mAP), ``rerank``, ``visualize``; then ``losses``, ``samplers``
and ``fastdata`` for the tricks and speed, ``own_data`` for your own crops, ``exercises`` and
``student`` for the classroom, and ``series`` to run every notebook.
"""

__version__ = "0.1.0"
