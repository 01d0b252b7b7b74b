"""The job record: what a finished job ran with, written beside its product (``<stem>.job.json``).

It holds the stage, the job's labels, the config files and ``--set`` overrides, the resolved values of every
config key the stage reads, and the version of the code it ran (a hash over the source files it imports).
Nothing time- or host-dependent goes in: two runs of the same job on the same inputs write the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ccalign.config import lookup
from ccalign.io import atomic_write_json
from ccalign.pipeline import Stage, code_version, job_code, job_params


def write_record(
    path: str | os.PathLike,
    spec: Stage,
    cfg: dict,
    files: Sequence[str],
    overrides: Sequence[str],
    labels: dict[str, str],
) -> None:
    atomic_write_json(
        {
            "stage": spec.name,
            "labels": labels,
            "config": {"files": list(files), "overrides": list(overrides)},
            "values": {key: lookup(cfg, key) for key in job_params(spec, labels, cfg)},
            "code": code_version(job_code(spec, labels)),
        },
        path,
    )
