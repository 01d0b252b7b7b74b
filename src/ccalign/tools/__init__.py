"""Commands that are not pipeline stages: ``ccalign plan`` and ``ccalign cache-verify``."""
