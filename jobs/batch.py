"""Entry script for ``ray job submit -- python jobs/batch.py --model DIR --input ... --output DIR ...``
(same flags as ``llmray batch``; on a cluster, inputs and the output directory must be reachable from every
node: shared storage or ``s3://``-style URIs)."""

from __future__ import annotations

import sys

from llmray.batch.cli import main

if __name__ == "__main__":
    sys.exit(main())
