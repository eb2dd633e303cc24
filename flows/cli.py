"""The ``vggprice`` command: the common jobs, each a Prefect flow run."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from pydantic import ValidationError

from tasks.labels import PriceRule


def _rule(args: argparse.Namespace) -> PriceRule | None:
    if args.means is None and args.sigma is None:
        return None
    fields: dict = {}
    if args.means is not None:
        try:
            fields["means"] = [float(x) for x in args.means.split(",")]
        except ValueError:
            raise ValueError(
                f"--means must be 10 comma-separated numbers, got {args.means!r}"
            ) from None
    if args.sigma is not None:
        fields["sigma"] = args.sigma
    return PriceRule(**fields)


def _cmd_ingest(args: argparse.Namespace) -> dict:
    from flows.ingest import ingest_flow

    return ingest_flow(store=args.store, source=args.source)


def _cmd_label(args: argparse.Namespace) -> dict:
    from flows.label import label_flow

    return label_flow(
        dataset_version=args.dataset_version, store=args.store, rule=_rule(args), seed=args.seed
    )


def _cmd_run(args: argparse.Namespace) -> dict:
    from flows.pipeline import retrain_flow

    return retrain_flow(store=args.store, source=args.source, rule=_rule(args), seed=args.seed)


def _human(result: dict, indent: str = "") -> str:
    lines = []
    for key, value in result.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.append(_human(value, indent + "  "))
        else:
            lines.append(f"{indent}{key}: {value}")
    return "\n".join(lines)


def _add_label_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed for the price draw (default 0)")
    p.add_argument("--means", help="10 comma-separated class means (default: DESIGN.md's rule)")
    p.add_argument("--sigma", type=float, help="noise sigma around each class mean (default 3)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vggprice", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", help="s3://bucket/prefix or a directory (default ./lake)")
    common.add_argument("--json", action="store_true", help="print a JSON result")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", parents=[common], help="Fashion-MNIST into the store")
    p.add_argument("--source", help="directory with the four IDX files")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("label", parents=[common], help="prices for a dataset version")
    p.add_argument("dataset_version", help="as printed by 'vggprice ingest'")
    _add_label_args(p)
    p.set_defaults(func=_cmd_label)

    p = sub.add_parser("run", parents=[common], help="the whole pipeline on this machine")
    p.add_argument("--source", help="directory with the four IDX files")
    _add_label_args(p)
    p.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], dict] = args.func
    try:
        result = func(args)
    except ValidationError as err:
        first = err.errors()[0]
        print(f"vggprice: error: {first['msg']}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, KeyError) as err:
        msg = str(err).strip("'\"") or type(err).__name__
        print(f"vggprice: error: {msg.splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str) if args.json else _human(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
