"""The `xtra` command: `xtra pretrain`, `xtra probe`, `xtra sweep`, `xtra data prepare|inspect`,
`xtra visualize`, `xtra export`, `xtra promote`, `xtra submit`.

Each subcommand's work lives in its own module, imported only when that subcommand runs.
Errors in user input (config keys, URIs, files) end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback
from collections.abc import Sequence

from pipelines import console
from pipelines.errors import UserError
from pipelines.redaction import redact, redacting
from xtra_core.config import ConfigError


def _add_verbose(p: argparse.ArgumentParser) -> None:
    """`--verbose` is global (`xtra --verbose pretrain ...`) and accepted after the subcommand."""
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show Ray's own output too (same as xtra --verbose)")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    _add_verbose(p)
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
        prog="xtra",
        description="XTRA pretraining on Ray: data, pretrain, probe, sweep, visualize, export, promote, submit.",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own output too (worker logs, Ray Data progress bars, library warnings)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    # -- data
    data = sub.add_parser("data", help="prepare or inspect an image dataset")
    dsub = data.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser(
        "prepare",
        help="write a dataset as class folders <dest>/<split>/<class>/*.png, or as WebDataset shards",
    )
    prep.add_argument(
        "--source", required=True, help="'fashion-mnist' (Debian package files), an image folder or a manifest .csv/.parquet"
    )
    prep.add_argument("--dest", required=True, help="local directory or s3://bucket/prefix")
    prep.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (else AWS_ENDPOINT_URL)")
    prep.add_argument(
        "--limit", type=int, default=None, help="at most this many images per split (seeded)"
    )
    prep.add_argument(
        "--format", choices=("folders", "shards"), default="folders",
        help="folders: <dest>/<split>/<class>/<file>; shards: <dest>/<split>/shard-000000.tar ... "
        "(WebDataset tar, the original bytes + <key>.cls) with index.json, and <dest>/classes.json",
    )
    prep.add_argument(
        "--shard-size", type=int, default=1000, help="images per shard with --format shards (default 1000)"
    )
    _add_verbose(prep)
    prep.set_defaults(func=_run_data_prepare)
    insp = dsub.add_parser(
        "inspect", help="decode every file through the pipeline; print one JSON object"
    )
    insp.add_argument("uri", help="local directory, s3://bucket/prefix, or a manifest .csv/.parquet")
    insp.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (else AWS_ENDPOINT_URL)")
    _add_verbose(insp)
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

    # -- submit
    sbm = sub.add_parser(
        "submit",
        usage="xtra submit {pretrain,probe,sweep} [options] -- ARGS",
        help="run pretrain / probe / sweep on a Ray cluster as a Ray job",
        description="Submit `xtra COMMAND ARGS` to a Ray cluster (Ray's Job Submission API) with "
        "the runtime env of cluster/runtime_env.yaml; prints the job id and the commands to "
        "follow its logs and stop it. Example: xtra submit pretrain --address "
        "http://head:8265 -- --config configs/vit_b16_in1k.yaml --data s3://bucket/imagenet",
    )
    sbm.add_argument("job_command", choices=["pretrain", "probe", "sweep"], metavar="COMMAND",
                     help="the xtra command to run on the cluster: pretrain, probe or sweep")
    sbm.add_argument("--address", default=None,
                     help="the Ray job server (dashboard) address, e.g. http://head:8265 "
                     "(default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)")
    sbm.add_argument("--runtime-env", default=None, metavar="PATH",
                     help="runtime env YAML (default: <working dir>/cluster/runtime_env.yaml)")
    sbm.add_argument("--working-dir", default=None, metavar="DIR",
                     help="the project directory uploaded with the job (default: the runtime "
                     "env's working_dir, i.e. the current directory)")
    sbm.add_argument("--no-pip", dest="pip", action="store_false",
                     help="leave out the runtime env's pip packages: for clusters whose nodes "
                     "already have them installed (a local test cluster, a prebuilt image)")
    sbm.add_argument("--submission-id", default=None,
                     help="the job's id (default: xtra-COMMAND-<time>-<random>)")
    sbm.add_argument("--entrypoint-num-cpus", type=float, default=None,
                     help="CPUs reserved for the job's driver process (default: none, on the head)")
    sbm.add_argument("--follow", action="store_true",
                     help="stream the job's logs until it ends; exit 0 only if it SUCCEEDED")
    sbm.set_defaults(func=_run_submit)
    # -- visualize / export / promote (the registry and pictures)
    vis = sub.add_parser(
        "visualize",
        help="the Figure-4 picture (input | next-block predictions) of a model, or the mask",
    )
    _add_config_args(vis)
    vis.add_argument(
        "--model", default=None,
        help="models:/name/version, models:/name@alias, or a directory with model.safetensors",
    )
    vis.add_argument("--data", default=None, help="dataset URI whose images are shown")
    vis.add_argument("--split", default=None, help="split to take images from (default: test, else train)")
    vis.add_argument("--n", type=int, default=8, help="number of images, a row each (default 8)")
    vis.add_argument("--head", type=int, default=0,
                     help="which head's predictions: 0 the next block (default), 1 the next-next "
                          "(models with model.blocks_ahead > 1), ...")
    vis.add_argument("--mask", action="store_true", help="draw the block-causal mask of --config instead")
    vis.add_argument("--out", required=True, help="PNG file to write")
    vis.set_defaults(func=_run_visualize)
    exp = sub.add_parser(
        "export", help="write a registered encoder as safetensors + config.json (xtra_core.load_encoder)"
    )
    _add_config_args(exp)
    exp.add_argument("--model", required=True, help="models:/name/version or models:/name@alias")
    exp.add_argument("--out", required=True, help="new directory to write")
    exp.add_argument(
        "--full", action="store_true",
        help="also write the whole XTRA (model.safetensors: decoder and heads) from the version's run",
    )
    exp.add_argument(
        "--allow-outside-source", action="store_true",
        help="follow a registered version whose files lie outside the tracking store's artifacts "
        "(refused by default: a registry entry could point at any path on this machine)",
    )
    exp.set_defaults(func=_run_export)
    prom = sub.add_parser("promote", help="set an alias (e.g. champion) on a registered version")
    _add_config_args(prom)
    prom.add_argument("--model", required=True, help="models:/name/version (or models:/name@alias)")
    prom.add_argument("--alias", required=True, help="alias to set, e.g. champion")
    prom.set_defaults(func=_run_promote)
    # -- sweep
    sweep = sub.add_parser(
        "sweep", help="ablation sweep (Table 6 axes or any config key) with Ray Tune: pretrain + probe"
    )
    _add_config_args(sweep)
    sweep.add_argument("--data", default=None, help="dataset URI with train/ and test/ splits")
    sweep.add_argument(
        "--axis",
        dest="axes",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="a swept setting: block_size, blocks_ahead, loss (l2,l1), order "
        "(raster,random,pseudo_random), decoder_depth, decoder_width, or any section.key (e.g. "
        "train.lr=1e-3,3e-3); repeat for a grid; keys joined by commas are paired, one value of "
        "each per point (e.g. \"model.image_size,model.patch_size=224:14,256:16\": 2 points)",
    )
    sweep.add_argument("--seeds", type=int, default=1, help="seeds per grid point (default 1)")
    sweep.add_argument(
        "--name", default=None, help="sweep name; the same name resumes a stopped sweep"
    )
    sweep.add_argument("--probe", choices=["linear", "attentive", "both"], default="linear",
                       help="probe of each trial's encoder; the first kind is the metric")
    sweep.add_argument("--max-concurrent", type=int, default=None,
                       help="trials at once (default: from the cluster's CPUs)")
    sweep.add_argument("--decode-cpus", type=float, default=1.0,
                       help="CPUs each trial leaves to Ray Data decoding (default 1)")
    sweep.add_argument("--asha", action="store_true",
                       help="stop trials early whose pretraining loss lags (ASHA)")
    sweep.add_argument("--asha-grace-steps", type=int, default=None,
                       help="steps before ASHA may stop a trial (default max_steps/4)")
    sweep.add_argument("--retry-failed", action="store_true",
                       help="on resume, run failed trials again")
    sweep.add_argument("--out", default=None, help="folder for the table/JSON/PNG")
    sweep.add_argument("--dry-run", action="store_true",
                       help="print one line per trial with its full override set, after checking "
                            "every grid point; start nothing (no Ray)")
    sweep.set_defaults(func=_run_sweep)
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

    shard_size = args.shard_size if args.format == "shards" else None
    prepare(args.source, args.dest, args.s3_endpoint, args.limit, shard_size)
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


def _run_submit(args: argparse.Namespace) -> int:
    from pipelines.submit import follow, load_runtime_env, submit

    env = load_runtime_env(args.runtime_env, args.working_dir, pip=args.pip)
    job = submit(args.address, args.job_command, args.job_args, env, args.submission_id,
                 args.entrypoint_num_cpus)
    print(f"[xtra] submitted job {job.submission_id} to {job.address}: {job.entrypoint}", flush=True)
    for what, cmd in job.commands().items():
        print(f"[xtra] {what + ':':8}{cmd}", flush=True)
    if not args.follow:
        return 0
    try:
        status = follow(job)
    except KeyboardInterrupt:
        print(f"\n[xtra] stopped following; job {job.submission_id} keeps running "
              f"(stop it with: {job.commands()['stop']})", flush=True)
        return 130
    print(f"[xtra] job {job.submission_id} {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def split_job_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`xtra submit COMMAND [options] -- ARGS`: ARGS (after the first --) belong to COMMAND and
    pass through untouched; argparse cannot take them after a subcommand's options."""
    argv = list(argv)
    if argv[:1] == ["submit"] and "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []
def _run_visualize(args: argparse.Namespace) -> int:
    from pipelines.visualize.command import draw_mask, visualize

    cfg = _load(args)
    if args.mask:
        print(json.dumps(draw_mask(cfg, args.out)), flush=True)
        return 0
    if not args.model or not cfg.data.uri:
        raise UserError("xtra visualize needs --model and --data (or --mask for the mask picture)")
    if args.n < 1:
        raise UserError(f"--n {args.n}: give at least one image")
    print(json.dumps(visualize(cfg, args.model, args.out, args.n, args.split, args.head)), flush=True)
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from pipelines.model_commands import export_model

    print(json.dumps(export_model(_load(args), args.model, args.out, args.full,
                                   args.allow_outside_source)), flush=True)
    return 0


def _run_promote(args: argparse.Namespace) -> int:
    from pipelines.model_commands import promote

    print(json.dumps(promote(_load(args), args.model, args.alias)), flush=True)
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    """Prints one line per trial event and the result table; a JSON summary line at the end."""
    # tune -> pipelines is the layering; the CLI dispatching to tune is the one allowed upward
    # edge, so it stays a lazy import inside this handler
    from tune.sweep import SweepOptions, run_sweep

    if args.dry_run:
        from tune.space import dry_run

        print("\n".join(dry_run(_load(args), args.axes, args.seeds)), flush=True)
        return 0
    kinds = ("linear", "attentive") if args.probe == "both" else (args.probe,)
    options = SweepOptions(
        name=args.name, seeds=args.seeds, kinds=kinds, max_concurrent=args.max_concurrent,
        decode_cpus=args.decode_cpus, asha=args.asha, asha_grace_steps=args.asha_grace_steps,
        retry_failed=args.retry_failed, verbose=args.verbose, out_dir=args.out,
    )
    out = run_sweep(_load(args), args.axes, options)
    print(json.dumps({k: out[k] for k in ("name", "experiment_path", "parent_run_id", "files",
                                          "interrupted")}), flush=True)
    if out["interrupted"]:
        return 130
    statuses = [r["status"] for r in out["rows"]]
    return 1 if "failed" in statuses and "done" not in statuses else 0  # nothing to compare


def known_failure(exc: BaseException) -> str | None:
    """The one line for a failure the user can fix that does not arrive as a UserError (a Ray
    cluster that wants an auth token, a product error that Ray wrapped), else None."""
    text = str(exc)
    if type(exc).__name__ == "AuthenticationError" or "auth token" in text.lower() and "ray" in text.lower():
        return ("the Ray cluster wants an auth token (token authentication is on): set "
                "RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN, or in a file named by "
                "RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token); `ray get-auth-token` on the head "
                "node prints it")
    cause = getattr(exc, "cause", None) or exc.__cause__
    if isinstance(cause, (ConfigError, UserError)):
        return str(cause)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `xtra` command. Every line it prints or logs passes `pipelines.redaction`; bad input
    ends in one line `xtra: error: ...` on stderr and exit code 2; an unexpected failure prints its
    traceback (redacted too) and exits 1."""
    argv, job_args = split_job_args(sys.argv[1:] if argv is None else argv)
    with redacting():
        args = build_parser().parse_args(argv)
        args.job_args = job_args
        # the product's own progress lines (loggers named xtra.*) go to stderr; Ray's only if verbose
        console.configure(args.verbose)
        try:
            return int(args.func(args) or 0)
        except (ConfigError, UserError) as e:
            return _fail(str(e))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - the one top-level handler
            line = known_failure(e)
            if line is not None:
                return _fail(line)
            traceback.print_exception(e, file=sys.stderr)  # each line redacted by the stream
            return 1


def _fail(message: str) -> int:
    """`xtra: error: <message>` on stderr as one line (redacted); exit code 2."""
    line = " ".join(redact(message).split())
    print(f"xtra: error: {line}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
