"""Entry script for ``ray job submit -- python jobs/serve.py --model DIR ...`` (same flags as ``llmray serve``).

On KubeRay prefer a RayService whose serveConfigV2 names ``llmray.serve.app:build_app``; this script is for
a quick deployment onto a running cluster from a job.
"""

from __future__ import annotations

import sys

from llmray.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
