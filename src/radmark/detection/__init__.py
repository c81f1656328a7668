"""Detection: white-box (classifier rows vs carriers) and black-box (twin sign test) tests with exact p-values.

Entry points: :func:`radmark.detection.api.detect` (pipeline stage), ``python -m radmark.detection.cli``
(third-party suspect), ``python -m radmark.detection.calibrate`` (``make calibrate``).
"""
