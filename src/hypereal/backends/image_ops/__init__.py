"""Deterministic image edits with Pillow: crop, resize, upscale, rotate, flip, grayscale and
format conversion.

:class:`ImageOperations` is the offline ``image-edit`` backend for the edits that need no
model. It does exactly what it names and nothing else: upscaling is Lanczos resampling plus
an unsharp mask (no generative super-resolution), and an instruction it cannot carry out is
answered with a client error that lists what it can do, never with a look-alike edit.

- :mod:`.plan`: a request as a plan of steps (``params.operation``, size, aspect ratio).
- :mod:`.instructions`: the natural-language instruction parser.
- :mod:`.operations`: the steps, and :func:`apply_request_geometry` for other backends.
- :mod:`.backend`: :class:`ImageOperations`.

Decoding and encoding go through the one codec, :mod:`hypereal.media.images`.
"""

from hypereal.backends.image_ops.backend import ImageOperations
from hypereal.backends.image_ops.operations import apply_request_geometry
from hypereal.backends.image_ops.plan import parse_colour

__all__ = ["ImageOperations", "apply_request_geometry", "parse_colour"]
