"""``python -m layerline.autoscale --name D --config autoscale.json``: a deployment's autoscaler process
(``layerline deploy --autoscale`` starts it; ``layerline down`` stops it)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from layerline.errors import LayerlineError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layerline.autoscale", description=__doc__)
    parser.add_argument("--name", required=True, help="the deployment")
    parser.add_argument("--config", required=True, help="an AutoscaleConfig JSON file")
    parser.add_argument("--metrics-host", default="127.0.0.1")
    parser.add_argument("--metrics-port", type=int, help="serve GET /metrics here (0: a free port)")
    parser.add_argument("--ready-file", help="write {pid, metrics_port, metrics_url} here once running")
    parser.add_argument("--log-level", default=os.environ.get("LAYERLINE_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s autoscaler %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from layerline.autoscale.policy import AutoscaleConfig
    from layerline.autoscale.service import run_autoscaler

    try:
        run_autoscaler(
            args.name,
            AutoscaleConfig.load(args.config),
            metrics_host=args.metrics_host,
            metrics_port=args.metrics_port,
            ready_file=args.ready_file,
        )
    except LayerlineError as exc:
        print(f"layerline autoscale: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
