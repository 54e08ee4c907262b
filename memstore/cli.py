"""The ``memstore`` command line.

``memstore demo`` is built in. Other packages add subcommands through the entry-point
group ``memstore.commands`` (``name = "module:main"``, called with the remaining
arguments): the trainer registers ``memstore train`` that way, so memstore itself
never imports the trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from importlib.metadata import entry_points

from .demo import DemoArgs, run_demo

COMMANDS_GROUP = "memstore.commands"


def _add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    """One --option per (int) field of the dataclass, defaulting to the field's default."""
    for field in dataclasses.fields(cls):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=field.default)


def _demo(ns: argparse.Namespace) -> int:
    args = DemoArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(DemoArgs)})
    r = run_demo(args)
    print(
        f"table {r.rows:,} rows x {args.dim}: loss {r.first_loss:.4f} -> {r.last_loss:.4f} in "
        f"{args.steps} steps; {r.tokens_per_s:,.0f} tokens/s, {r.rows_read_per_s / 1e6:.1f} M "
        f"rows read/s (lookup + backward + sparse Adam, in-process, {r.seconds:.1f} s)"
    )
    return 0


def _plugins() -> dict:
    return {ep.name: ep for ep in entry_points(group=COMMANDS_GROUP)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    plugins = _plugins()
    if argv and argv[0] in plugins and argv[0] != "demo":
        return int(plugins[argv[0]].load()(argv[1:]) or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="memstore", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a MemoryLayer with a 1M-row in-process table")
    _add_dataclass_options(demo, DemoArgs)
    demo.set_defaults(run=_demo)
    for name, ep in sorted(plugins.items()):
        if name != "demo":
            sub.add_parser(name, help=f"from {ep.value}; memstore {name} -h lists its options")
    ns = parser.parse_args(argv)
    return ns.run(ns)


if __name__ == "__main__":
    sys.exit(main())
