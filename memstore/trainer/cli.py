"""The command line: ``python -m memstore.trainer.train`` and ``memstore train``."""

from __future__ import annotations

import argparse
import logging

import memstore
from memstore import InvalidArgument

__all__ = ["main", "build_parser"]

DESCRIPTION = "Train the memory-layer LM (in-process, or on Ray Train with workers >= 1)."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memstore train", description=DESCRIPTION)
    parser.add_argument(
        "--config",
        help="a YAML file, or a built-in config's name "
        "(trainer.configs.names(): tiny, facts-small-memory, ...)",
    )
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest step with model and store checkpoints "
        "(never deletes a checkpoint)",
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run where checkpoints exist, deleting them",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set workers=2 --set model.dim=64",
    )
    return parser


def summary_line(run_dir: str, result: dict) -> str:
    ev = result.get("eval") or {}
    figures = ", ".join(f"{k} {v:.4f}" for k, v in ev.items() if isinstance(v, float))
    return (
        f"{run_dir}: {result['step']} steps, {result['tokens']:,} tokens in "
        f"{result['seconds']:.1f} s; final loss {result['losses'][-1][1]:.4f}; {figures}"
    )


def main(argv: list[str] | None = None) -> int:
    """Parse, load the config, train, print one summary line; errors exit with 2."""
    from .config import load_config
    from .train import train

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        args = load_config(ns.config, ns.set)
    except InvalidArgument as e:
        parser.error(str(e))
    try:
        result = train(args, resume=ns.resume, overwrite=ns.overwrite)
    except (InvalidArgument, memstore.CheckpointError) as e:
        parser.exit(2, f"memstore train: error: {e}\n")
    print(summary_line(args.run_dir, result))
    return 0
