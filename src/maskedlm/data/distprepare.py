"""`maskedlm prepare` under torchrun: rank r of N prepares part r/N of the input files, then rank 0 merges the parts.

Parts are written beside --out and hard-linked into it by merge (prepare.py), so the token data is written once and
the data dir appears whole or not at all. Rank logic stays in distributed.py; this module only orders the steps.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from maskedlm import distributed as dist
from maskedlm.data.prepare import check_data_out, merge, prepare

# A rank may tokenize for hours before the others hear from it: the collectives here wait that long. A rank that
# dies is noticed sooner, since torchrun then stops the others.
WAIT_MINUTES = 24 * 60.0


def prepare_distributed(inputs, tokenizer, seq_len, out, overwrite: bool = False, **options) -> dict | None:
    """Prepare into `out` with every torchrun rank reading its share of the input files (`options` as prepare's).
    Returns the merged meta dict on rank 0, None on the others; a UserError on any rank is raised on all."""
    info = dist.init("cpu", timeout_minutes=WAIT_MINUTES)  # gloo: only small objects travel between ranks
    out = Path(out)
    parts_root = out.parent / f".{out.name}.parts"
    part = parts_root / f"part_{info.rank:05d}"
    try:
        dist.everywhere(check_data_out, out, overwrite, inputs, main_only=True)  # a bad --out fails before hours of work
        dist.everywhere(prepare, inputs, tokenizer, seq_len, part, shard=(info.rank, info.world_size),
                        overwrite=True, **options)
        parts = [parts_root / f"part_{r:05d}" for r in range(info.world_size)]
        return dist.everywhere(merge, parts, out, overwrite=overwrite, main_only=True)
    finally:
        # The merged dir holds its own links to the shards: the part dirs can go (after every rank is done with them).
        dist.barrier()
        dist.on_main(shutil.rmtree, parts_root, ignore_errors=True)
        dist.shutdown()
