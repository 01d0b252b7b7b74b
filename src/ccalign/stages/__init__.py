"""The pipeline's stages: one module each, declaring ``SPEC`` (a :class:`ccalign.pipeline.Stage`).

A stage module stays light at import (the CLI and the Snakefile import every one): heavy libraries are
imported inside ``main``.
"""
