"""Serve the retraining flow on a cron schedule from this machine (Prefect `serve()`).

    prefect server start --host 127.0.0.1          # once, in another terminal (or any API)
    python -m flows.deploy --cron "0 3 * * *"      # from the project root; keeps running

The process registers the deployment `rprm-retrain/<name>` with its schedule and runs the
scheduled (and manually triggered) flow runs itself, one at a time. Trigger one now with
`prefect deployment run rprm-retrain/<name>`. For a cluster, use `prefect.yaml` with a
process work pool instead (`prefect deploy --all`, then `prefect worker start --pool rprm`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect.schedules import Cron

from flows.pipeline import STAGES
from flows.retrain import retrain

DEFAULT_NAME = "retrain-nightly"
DEFAULT_CRON = "0 3 * * *"


def serve_retraining(
    name: str = DEFAULT_NAME,
    cron: str = DEFAULT_CRON,
    timezone: str = "UTC",
    project_dir: str = ".",
    stages: list[str] | None = None,
    retries: int = 3,
) -> None:
    """Create the scheduled deployment of `rprm-retrain` and serve its runs (blocks)."""
    retrain.serve(
        name=name,
        schedules=[Cron(cron, timezone=timezone)],
        parameters={"project_dir": str(Path(project_dir).resolve()), "stages": stages, "retries": retries},
        tags=["rprm", "retraining"],
        description="Intake data/incoming, rerun the DVC pipeline if anything changed, promotion gate.",
        limit=1,
    )


def main() -> None:
    """CLI of serve_retraining."""
    parser = argparse.ArgumentParser(description="Serve the R-PRM retraining flow on a cron schedule.")
    parser.add_argument("--name", default=DEFAULT_NAME, help="deployment name")
    parser.add_argument("--cron", default=DEFAULT_CRON, help="cron schedule (default: daily 03:00)")
    parser.add_argument("--timezone", default="UTC")
    parser.add_argument("--project-dir", default=".")
    parser.add_argument("--stages", nargs="*", choices=STAGES, help="only these stages (default: all)")
    parser.add_argument("--retries", type=int, default=3, help="retries of remote-engine stages")
    args = parser.parse_args()
    serve_retraining(args.name, args.cron, args.timezone, args.project_dir, args.stages, args.retries)


if __name__ == "__main__":
    main()
