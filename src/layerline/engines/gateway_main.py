"""``python -m layerline.engines.gateway_main --config gateway.json``: the local engine's gateway process."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from layerline.engines.configs import GATEWAY_CONFIG_VERSION
from layerline.errors import FormatError, LayerlineError

__all__ = ["main"]


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"cannot read gateway config {path}: {exc}") from exc
    if data.get("format") != "layerline.gateway" or data.get("format_version") != GATEWAY_CONFIG_VERSION:
        raise FormatError(f"{path} is not a layerline gateway config of version {GATEWAY_CONFIG_VERSION}")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layerline-gateway", description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s gateway %(name)s: %(message)s"
    )
    from layerline.serve.app import GatewaySettings, run_gateway
    from layerline.serve.model_info import ModelInfo

    try:
        config = _load(args.config)
        model = ModelInfo.from_json(config["model"])
        settings = GatewaySettings(**config["settings"])
        p = config["pipeline"]
        if p.get("transport") == "redis":
            from layerline.runtime.redis_pipeline import RedisPipeline

            pipeline = RedisPipeline(
                p["redis_url"],
                stages=p["stages"],
                prefix=p["prefix"],
                max_in_flight=settings.max_in_flight,
                elastic_stages=p.get("elastic_stages", ()),
            )
            run_gateway(pipeline, model, settings)
            return 0
        from layerline.runtime.pipeline import DirectPipeline

        pipeline = DirectPipeline(
            p["host"],
            p["port"],
            stages=p["stages"],
            result_host=p["result_host"],
            result_port=p["result_port"],
            max_in_flight=settings.max_in_flight,
        )
        run_gateway(pipeline, model, settings)
    except LayerlineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
