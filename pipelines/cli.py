"""The `xtra` command: `xtra pretrain`, `xtra probe`, `xtra data prepare|inspect`.

Each subcommand's work lives in its own module, imported only when that subcommand runs.
Errors in user input (config keys, URIs, files) end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Sequence

from pipelines.errors import UserError
from pipelines.redaction import redact
from xtra_core.config import ConfigError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default="tiny",
        help="a preset (tiny, vit_b16, vit_h14), a YAML file, or a name in configs/ (default: tiny)",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (parsed as YAML), e.g. --set train.max_steps=100; repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xtra", description="XTRA pretraining on Ray: data, pretrain, probe."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    # -- data
    data = sub.add_parser("data", help="prepare or inspect an image dataset")
    dsub = data.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser(
        "prepare", help="write a dataset in the class-folder layout <dest>/<split>/<class>/*.png"
    )
    prep.add_argument(
        "--source", required=True, help="'fashion-mnist' (Debian package files) or an image folder"
    )
    prep.add_argument("--dest", required=True, help="local directory or s3://bucket/prefix")
    prep.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (else AWS_ENDPOINT_URL)")
    prep.add_argument(
        "--limit", type=int, default=None, help="at most this many images per split (seeded)"
    )
    prep.set_defaults(func=_run_data_prepare)
    insp = dsub.add_parser(
        "inspect", help="decode every file through the pipeline; print one JSON object"
    )
    insp.add_argument("uri", help="local directory, s3://bucket/prefix, or a manifest .csv/.parquet")
    insp.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (else AWS_ENDPOINT_URL)")
    insp.set_defaults(func=_run_data_inspect)

    # -- pretrain
    pre = sub.add_parser("pretrain", help="pretrain XTRA with Ray Train + DeepSpeed")
    _add_config_args(pre)
    pre.add_argument("--data", default=None, help="dataset URI (overrides data.uri)")
    pre.set_defaults(func=_run_pretrain)

    # -- probe
    probe = sub.add_parser("probe", help="linear / attentive probes on a frozen encoder")
    _add_config_args(probe)
    probe.add_argument(
        "--model",
        required=False,
        default=None,
        help="models:/name/version, models:/name@alias, or a local export directory",
    )
    probe.add_argument("--data", default=None, help="dataset URI with train/ and test/ splits")
    probe.add_argument("--kind", choices=["linear", "attentive", "both"], default="both")
    probe.add_argument(
        "--random-init",
        action="store_true",
        help="probe a randomly initialised encoder of the same config (the baseline)",
    )
    probe.set_defaults(func=_run_probe)
    return parser


def _load(args: argparse.Namespace):
    """The config of a job command: `--config`, then `--set`, then `--data` over `data.uri`."""
    from pipelines.config_io import load_config

    cfg = load_config(args.config, args.sets)
    if getattr(args, "data", None):
        cfg.data.uri = args.data
    return cfg


def _run_data_prepare(args: argparse.Namespace) -> int:
    from pipelines.data.commands import prepare

    prepare(args.source, args.dest, args.s3_endpoint, args.limit)
    return 0


def _run_data_inspect(args: argparse.Namespace) -> int:
    from pipelines.data.commands import inspect

    print(json.dumps(inspect(args.uri, args.s3_endpoint)))
    return 0


def _run_pretrain(args: argparse.Namespace) -> int:
    from pipelines.pretrain.driver import run_pretraining

    out = run_pretraining(_load(args))
    print(json.dumps({k: v for k, v in out.items() if k != "metrics"}, default=str), flush=True)
    return 0


def _run_probe(args: argparse.Namespace) -> int:
    """Prints one JSON object per probe kind on stdout; Ray/Tune chatter goes to stderr."""
    from pipelines.probe.driver import probe

    cfg = _load(args)
    # --kind both (the default) means the config's probe.kinds (both kinds unless narrowed)
    kinds = list(cfg.probe.kinds) if args.kind == "both" else [args.kind]
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        results = probe(cfg, args.model, kinds, args.random_init)
    for r in results:
        print(json.dumps(r), file=stdout, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the product's own progress lines (loggers named xtra.*) go to stderr
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    logging.getLogger("xtra").setLevel(logging.INFO)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UserError) as e:
        print(f"xtra: error: {redact(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
