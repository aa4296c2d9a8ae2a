"""The ``fedshare`` command.

Every user-caused problem ends as one line on stderr and exit status 2; outputs are written only
when complete.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from math import nan
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from fedshare.atomic import write_json
from fedshare.data import PreparedData, SharingConfig, prepare
from fedshare.data.loaders import SOURCES
from fedshare.errors import FedShareError
from fedshare.models import CENTRAL_MODELS
from fedshare.reports import data_stats, format_stats
from simulations.processes import signals_interrupt

if TYPE_CHECKING:
    from fedshare.unlearning.config import UnlearningConfig


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        message = f"expected comma-separated numbers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="ml-100k", help=f"one of {', '.join(SOURCES)}")
    group.add_argument("--path", help="local folder or file in the publisher's format")
    group.add_argument("--prepared", help="a folder written by 'fedshare data prepare' "
                       "(replaces every other data option)")
    group.add_argument("--min-user-interactions", type=int,
                       help="user filter (default: the paper's value for the dataset)")
    group.add_argument("--split", type=_fractions, default=(0.8, 0.1, 0.1),
                       help="train,valid,test fractions (default 0.8,0.1,0.1)")
    group.add_argument("--split-seed", type=int, default=0)
    group.add_argument("--groups", type=_fractions, default=(0.1, 0.2, 0.7),
                       help="fractions of full,partial,non-sharing users (default 0.1,0.2,0.7)")
    group.add_argument("--partial-share", type=float, default=0.3,
                       help="fraction a partial sharer shares (default 0.3)")
    group.add_argument("--unshare-users", type=float, default=0.3,
                       help="gamma: fraction of sharing users who unshare (default 0.3)")
    group.add_argument("--unshare-items", type=float, default=1.0,
                       help="fraction of an unsharing user's shared data unshared (default 1)")
    group.add_argument("--plan-seed", type=int, default=0)


def _load(args: argparse.Namespace) -> PreparedData:
    if args.prepared:
        return PreparedData.load(args.prepared)
    if len(args.split) != 3:
        raise FedShareError("--split needs three fractions: train,valid,test")
    sharing = SharingConfig(tuple(args.groups), args.partial_share, args.unshare_users,
                            args.unshare_items, args.plan_seed)
    return prepare(args.dataset, args.path, min_user_interactions=args.min_user_interactions,
                   split_fractions=tuple(args.split), split_seed=args.split_seed,
                   sharing=sharing)


def _cmd_stats(args: argparse.Namespace) -> None:
    stats = data_stats(_load(args))
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))


def _cmd_prepare(args: argparse.Namespace) -> None:
    data = _load(args)
    folder = data.save(args.out)
    print(f"wrote {folder} (fingerprint {data.fingerprint()})")


def _cmd_central(args: argparse.Namespace) -> None:
    from fedshare.central import CentralConfig, run_central

    if args.epochs < 1:
        raise FedShareError(f"--epochs must be >= 1, got {args.epochs}")
    data = _load(args)
    config = CentralConfig(max_epochs=args.epochs, seed=args.seed)
    out = Path(args.out) if args.out else None
    if out is not None and (out / "summary.json").exists():
        raise FedShareError(f"{out / 'summary.json'} already exists; choose a new --out")

    def progress(epoch: int, valid: dict) -> None:
        print(f"  epoch {epoch:4d}  valid HR@20 {valid['hr@20']:.4f}  "
              f"NDCG@20 {valid['ndcg@20']:.4f}", file=sys.stderr, flush=True)

    result = run_central(data.split, args.model, config, progress)
    summary = {"dataset": data.dataset, "fingerprint": data.fingerprint(), **result.to_dict()}
    if out is not None:
        write_json(out / "summary.json", summary)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{args.model} on {data.dataset}: best epoch {result.best_epoch} "
          f"({result.seconds:.1f} s)")
    for part in ("valid", "test"):
        m = getattr(result, part)
        print(f"  {part:5s} HR@20 {m['hr@20']:.4f}  NDCG@20 {m['ndcg@20']:.4f}  "
              f"Recall@20 {m['recall@20']:.4f}")


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors reduced to the one-line form of every other error."""

    def error(self, message: str) -> NoReturn:
        print(f"fedshare: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _cmd_run(args: argparse.Namespace) -> None:
    from simulations.experiment import resolve, resume_settings, run_experiment

    if args.resume and args.config:
        raise FedShareError("--resume takes the settings of the run it resumes; drop --config")
    experiment = resume_settings(args.resume, args.set) if args.resume else \
        resolve(args.config, args.set)
    if args.startup_timeout <= 0:
        raise FedShareError(f"--startup-timeout must be > 0, got {args.startup_timeout}")
    if args.ray_address and args.engine != "flower":
        raise FedShareError("--ray-address needs --engine flower")
    out, summary = run_experiment(experiment, args.out, args.engine,
                                  lambda line: print(f"  {line}", file=sys.stderr, flush=True),
                                  ray_address=args.ray_address, resume=args.resume,
                                  startup=args.startup_timeout)
    test = summary["test"]
    k, metric = (10, "Recall") if summary.get("family") == "sequence" else (20, "HR")
    print(f"{experiment.name}: test {metric}@{k} {test.get(f'{metric.lower()}@{k}', nan):.4f}  "
          f"NDCG@{k} {test.get(f'ndcg@{k}', nan):.4f}  "
          f"({summary['seconds']:.1f} s) -> {out}")


def _cmd_deploy(args: argparse.Namespace) -> None:
    """Device files for ``--devices`` users, then a TLS deployment with one authenticated
    SuperNode per device (:mod:`simulations.deploy`)."""
    from fedshare.data.device import pick_device_users, write_device_files
    from fedshare.runconfig import secagg_settings
    from simulations.deploy import deploy
    from simulations.experiment import resolve

    experiment = resolve(args.config, args.set)  # every setting checked before anything starts
    if experiment.run.get("family", "lightgcn") != "lightgcn":
        raise FedShareError("fedshare deploy serves the lightgcn family only")
    secagg_settings(experiment.run)  # the default defence too: the deployment applies it
    data = _load(args)
    work = Path(args.dir).resolve()
    if work.exists() and not work.is_dir():
        raise FedShareError(f"{work} is a file; --dir names a new folder")
    if work.exists() and any(work.iterdir()):
        raise FedShareError(f"{work} is not empty; choose a new --dir")
    users = pick_device_users(data, args.devices)
    devices = write_device_files(data, users, work / "devices")
    nodes = [{"device-file": str(path), "state-dir": str(work / "device-state")}
             for path in devices]
    out = deploy(work, nodes, {**experiment.run, "num-nodes": len(nodes),
                               "out-dir": str(work / "run")}, args.timeout)
    summary = json.loads((out / "summary.json").read_text())
    test = summary["test"]
    print(f"deployed run of {len(nodes)} devices (users {', '.join(map(str, users))}): test "
          f"HR@20 {test.get('hr@20', nan):.4f}  NDCG@20 {test.get('ndcg@20', nan):.4f} -> {out}")


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None


def _cmd_learning_table(args: argparse.Namespace) -> None:
    from simulations.learning_table import learning_table, to_markdown
    from simulations.tune_learning import CHOSEN, load_chosen

    settings = args.settings or (CHOSEN if CHOSEN.exists() else None)
    chosen = None if args.settings == "none" or settings is None else load_chosen(settings)
    folder, stats = learning_table(args.seeds, args.set, args.engine, args.out, args.workers,
                                   lambda line: print(line, file=sys.stderr, flush=True),
                                   chosen)
    print(to_markdown(stats))
    print(f"saved in {folder}")


def _cmd_tune_learning(args: argparse.Namespace) -> None:
    from simulations.tune_learning import GRIDS, tune_learning

    folder, record = tune_learning(args.plans, args.budget, args.grids or GRIDS, args.set,
                                   args.out, lambda line: print(line, file=sys.stderr,
                                                                flush=True))
    print(json.dumps({m: v["settings"] for m, v in record["methods"].items()}, indent=2))
    print(f"saved in {folder}")


def _cmd_pdc_sweep(args: argparse.Namespace) -> None:
    from simulations.pdc_sweep import eps_sweep

    references = () if args.references in ((), ("none",)) else args.references
    folder, _ = eps_sweep(args.eps, args.seeds, args.set, args.out, args.workers,
                          lambda line: print(line, file=sys.stderr, flush=True), references)
    print((folder / "pdc_sweep.md").read_text())
    print(f"saved in {folder} (plot: {folder / 'pdc_sweep.png'})")


def _unlearning_config(args: argparse.Namespace) -> UnlearningConfig:
    from fedshare.unlearning.config import UnlearningConfig

    return UnlearningConfig(rounds=args.unlearn_rounds, steps=args.unlearn_steps,
                            lr=args.unlearn_lr, tau=args.unlearn_tau, bpr=not args.no_bpr,
                            weight=args.unlearn_weight, local_epochs=args.unlearn_local_epochs)


def _plans(text: str) -> list[tuple[int, int]]:
    from simulations.plans import parse_plans

    try:
        return parse_plans(text)
    except FedShareError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_unlearning_table(args: argparse.Namespace) -> None:
    from fedshare.unlearning.config import UnlearningConfig
    from simulations.tuning import load_chosen
    from simulations.unlearning_table import to_markdown, unlearning_table

    config = _unlearning_config(args)
    settings = None
    if args.settings:
        if config != UnlearningConfig():
            raise FedShareError("--settings replaces the --unlearn-* and --no-bpr options; "
                                "drop them")
        settings = load_chosen(args.settings)
    folder, stats, figures = unlearning_table(
        args.seeds, args.set, config, args.canaries, not args.per_user_canaries, args.out,
        lambda line: print(line, file=sys.stderr, flush=True), plans=args.plans,
        groups=args.groups, gamma=args.gamma, settings=settings)
    print(to_markdown(stats))
    print(json.dumps(figures, indent=2))
    print(f"saved in {folder}")


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _cmd_cau_table(args: argparse.Namespace) -> None:
    import dataclasses

    import torch

    from fedshare.sequences.unlearning_methods import LEARNING, METHODS, CAUSettings
    from simulations.cau_table import TableSettings, cau_table

    for name in ("rounds", "unlearn_epochs", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise FedShareError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    torch.set_num_threads(args.threads)
    fed = LEARNING
    if args.rounds is not None:
        fed = dataclasses.replace(fed, rounds=args.rounds)
    settings = TableSettings(args.dataset, args.data_path, fed=fed, cau=CAUSettings(
        epochs=args.unlearn_epochs, batch_size=args.batch_size))
    folder, _, summary = cau_table(
        args.backbone, args.seeds, settings, args.methods or METHODS, args.out, args.resume,
        lambda line: print(line, file=sys.stderr, flush=True), args.report_only)
    print((folder / "cau_table.md").read_text())
    print(json.dumps(summary["targets"], indent=2))
    print(f"saved in {folder}")


def _cmd_privacy_audit(args: argparse.Namespace) -> None:
    from simulations.experiment import resolve
    from simulations.privacy_audit import SETTINGS, privacy_audit

    experiment = resolve(args.config, args.set)
    folder, summary = privacy_audit(
        experiment.config, experiment.run, args.seeds, args.settings or tuple(SETTINGS),
        args.users, args.out, args.resume, lambda line: print(line, file=sys.stderr,
                                                              flush=True))
    print((folder / "privacy_table.md").read_text())
    print(json.dumps(summary["targets"], indent=2))
    print(f"saved in {folder}")


def _cmd_tune_unlearning(args: argparse.Namespace) -> None:
    from simulations.tuning import GRIDS, load_grids, tune_unlearning

    folder, chosen = tune_unlearning(
        args.plans, args.groups, args.gamma, args.set, args.budget,
        load_grids(args.grids or GRIDS), args.seed, args.canaries, _unlearning_config(args),
        args.out, lambda line: print(line, file=sys.stderr, flush=True))
    for method, entry in chosen["methods"].items():
        settings = " ".join(f"{k}={v}" for k, v in entry["settings"].items())
        print(f"{method:>19}: {settings}  (score {entry['score']:.4f}, entry "
              f"{entry['setting'] + 1} of {chosen['budget']})")
    print(f"saved in {folder}; report with: fedshare unlearning-table --settings "
          f"{folder / 'chosen.json'} --plans SPLIT:PLAN,...")


def _cmd_reproduce(args: argparse.Namespace) -> None:
    from simulations.reproduce.plan import Design
    from simulations.reproduce.run import reproduce

    seeds = args.seeds if args.seeds is not None else 1 if args.quick else 3
    design = Design(args.target, args.dataset, args.path, seeds, args.quick, args.tuning_plans)
    folder = reproduce(design, args.out, args.resume, args.workers,
                       command=" ".join(["fedshare", *sys.argv[1:]]))
    print(f"report: {folder / 'report.md'}")


def _cmd_storage(args: argparse.Namespace) -> None:
    from fedshare.unlearning.fru_selection import FruSettings
    from fedshare.unlearning.replay import ReplayConfig
    from simulations.storage_study import storage_study, to_markdown

    if not args.snapshots or min(args.snapshots) < 1:
        raise FedShareError("--snapshots needs values M >= 1")
    try:
        replay = ReplayConfig(args.epoch_fraction, args.interval)
    except ValueError as exc:
        raise FedShareError(str(exc)) from None
    fru = FruSettings(args.alpha, args.beta, args.pool)  # both samplings are measured
    folder, means, figures = storage_study(
        args.seeds, args.set, args.snapshots, replay=replay, out=args.out,
        progress=lambda line: print(line, file=sys.stderr, flush=True), fru=fru)
    print(to_markdown(means))
    for key, value in figures.items():
        print(f"{key}: {value:.4g}")
    print(f"saved in {folder}")


def _cmd_bench(args: argparse.Namespace) -> None:
    from simulations import bench

    for name in ("threads", "repeats", "per_user_sample", "dim"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise FedShareError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.out is not None and args.out.is_dir():
        raise FedShareError(f"--out {args.out} is a folder; name a file for the figures")
    bench.run(args)


def _cmd_audit(args: argparse.Namespace) -> int:
    """Where a finished run's server stores could still hold what they must not; exit status 1
    when anything is found (:mod:`fedshare.unlearning.residue`)."""
    import tomllib

    from fedshare.data.device import DeviceData
    from fedshare.runconfig import data_key, load_data
    from fedshare.unlearning.residue import GroundTruth, audit_run, audit_superlink

    folder = Path(args.run_dir)
    if not (folder / "state.db").is_file():
        raise FedShareError(f"{folder} holds no state.db: not a Flower run folder")
    if args.devices:
        files = sorted(Path(args.devices).glob("*.json"))
        if not files:
            raise FedShareError(f"no device files (*.json) in {args.devices}")
        truth = GroundTruth.from_devices(DeviceData.load(str(f)) for f in files)
    else:
        try:
            run = tomllib.loads((folder / "config.toml").read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise FedShareError(f"{folder} holds no readable config.toml ({exc}); "
                                "give --devices for a deployment") from None
        truth = GroundTruth.from_plan(load_data(data_key(run, {})))
    findings = audit_run(folder, truth)
    # a deployment's SuperLink database: named, or beside the run folder (`fedshare deploy`)
    superlink = Path(args.superlink) if args.superlink else folder.parent / "superlink.db"
    if args.superlink and not superlink.is_file():
        raise FedShareError(f"no SuperLink database at {superlink}")
    if superlink.is_file():
        findings += audit_superlink(superlink, truth)
    for finding in findings:
        print(f"{finding.found:8d}  {finding.what:45s} {finding.place}")
    total = sum(f.found for f in findings)
    print(f"{total} found in {len(findings)} checks of {folder}")
    return 1 if total else 0


def _add_unlearning_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--unlearn-rounds", type=int, default=20, help="T_un")
    parser.add_argument("--unlearn-steps", type=int, default=10, help="server steps per round")
    parser.add_argument("--unlearn-weight", type=float, default=0.1, help="weight of L_CU")
    parser.add_argument("--unlearn-lr", type=float, default=3e-2)
    parser.add_argument("--unlearn-local-epochs", type=int, default=1,
                        help="local epochs of the remaining-data rounds")
    parser.add_argument("--unlearn-tau", type=float, default=0.5)
    parser.add_argument("--no-bpr", action="store_true", help="L_CU alone, without BPR on G_s")


def _add_plan_shape_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--groups", type=_fractions, help="fractions of full,partial,non-sharing "
                        "users of the --plans (default: the config data's, 0.1,0.2,0.7)")
    parser.add_argument("--gamma", type=float, help="fraction of sharing users who unshare in "
                        "the --plans (default: the config data's, 0.3)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedshare", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="datasets, splits and sharing plans")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    stats = data_commands.add_parser("stats", help="sizes of a dataset, its split and plan")
    _add_data_args(stats)
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(func=_cmd_stats)
    prep = data_commands.add_parser("prepare", help="write a split and sharing plan to disk")
    _add_data_args(prep)
    prep.add_argument("--out", required=True, help="new folder to write")
    prep.set_defaults(func=_cmd_prepare)

    central = commands.add_parser("central", help="centralised reference run")
    _add_data_args(central)
    central.add_argument("--model", choices=CENTRAL_MODELS, default="lightgcn")
    central.add_argument("--epochs", type=int, default=300, help="maximum epochs")
    central.add_argument("--seed", type=int, default=0)
    central.add_argument("--out", help="folder for summary.json")
    central.add_argument("--json", action="store_true", help="print the summary as JSON")
    central.set_defaults(func=_cmd_central)

    run = commands.add_parser("run", help="one federated learning run (Flower simulation)")
    run.add_argument("--config", help="a config file, e.g. simulations/configs/fedshare.toml")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a run setting (repeatable), e.g. --set rounds=50")
    run.add_argument("--engine", choices=("flower", "inprocess"), default="flower",
                     help="flower: the real app on Ray virtual nodes; inprocess: same code, "
                     "one process")
    run.add_argument("--startup-timeout", type=float, default=300.0, metavar="SECONDS",
                     help="give up when a Flower run has not begun its share round this long "
                     "after the launch (default 300)")
    run.add_argument("--ray-address", help="attach the virtual nodes to this Ray cluster "
                     "(e.g. 10.0.0.1:6379, started with 'ray start --head')")
    run.add_argument("--out", default="runs", help="parent folder of the run folder")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped Flower run from "
                     "the last round committed to RUN_DIR/state.db (--set rounds=N to extend)")
    run.set_defaults(func=_cmd_run)

    table = commands.add_parser("learning-table", help="every learning method over seeds")
    table.add_argument("--seeds", type=_seeds, default=(0, 1, 2))
    table.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a run setting for every federated cell")
    table.add_argument("--engine", choices=("flower", "inprocess"), default="inprocess")
    table.add_argument("--workers", type=int, default=2, help="parallel in-process cells")
    table.add_argument("--settings", metavar="CHOSEN_JSON",
                       help="the chosen.json of fedshare tune-learning: each tuned method runs "
                       "at its chosen settings (default simulations/learning_chosen.json, the "
                       "committed result; 'none': every method at its config's defaults)")
    table.add_argument("--out", default="runs")
    table.set_defaults(func=_cmd_learning_table)

    tune_l = commands.add_parser("tune-learning", help="choose the learning methods' settings "
                                 "on validation, on tuning plans, same budget each")
    tune_l.add_argument("--plans", type=_plans, default=[(100, 100), (101, 101)],
                        metavar="SPLIT:PLAN,...", help="tuning plans (default 100:100,101:101); "
                        "the reported plan 0:0 is refused")
    tune_l.add_argument("--budget", type=int, default=6,
                        help="candidate settings per method, the same for all (default 6)")
    tune_l.add_argument("--grids", help="TOML of the candidate settings (default "
                        "simulations/learning_grids.toml)")
    tune_l.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of every run (e.g. rounds=50)")
    tune_l.add_argument("--out", default="runs")
    tune_l.set_defaults(func=_cmd_tune_learning)


    sweep = commands.add_parser("pdc-sweep", help="PDC-FRS: utility against epsilon over seeds "
                                "(in process)")
    sweep.add_argument("--eps", type=_fractions, default=(0.1, 0.5, 1.0, 2.0, 5.0, 10.0),
                       help="comma-separated epsilons per shared item (default "
                       "0.1,0.5,1,2,5,10)")
    sweep.add_argument("--seeds", type=_seeds, default=(0, 1, 2),
                       help="model seeds (default 0,1,2)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a run setting of every cell, e.g. --set rounds=50")
    sweep.add_argument("--references", type=_names, default=("no-sharing", "wo-cl"),
                       help="variants run with the same seeds and drawn as bands (default "
                       "no-sharing,wo-cl; 'none' for none)")
    sweep.add_argument("--workers", type=int, default=2, help="parallel runs (default 2)")
    sweep.add_argument("--out", default="runs")
    sweep.set_defaults(func=_cmd_pdc_sweep)

    unl = commands.add_parser("unlearning-table", help="unlearning methods over seeds")
    unl.add_argument("--seeds", type=_seeds, default=(0, 1, 2))
    unl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a learning-phase setting")
    unl.add_argument("--canaries", type=int, default=5,
                     help="canary items per unsharing user for the audit (0 = off)")
    unl.add_argument("--per-user-canaries", action="store_true",
                     help="draw each user's canaries separately instead of one common set")
    _add_unlearning_args(unl)
    unl.add_argument("--settings", metavar="CHOSEN_JSON", help="every method at the settings "
                     "'fedshare tune-unlearning' chose (replaces the --unlearn-* options)")
    unl.add_argument("--plans", type=_plans, metavar="SPLIT:PLAN,...",
                     help="report over these fresh plans of the config's dataset (split "
                     "seed:plan seed, prepared in memory), each with every --seeds")
    _add_plan_shape_args(unl)
    unl.add_argument("--out", default="runs")
    unl.set_defaults(func=_cmd_unlearning_table)

    cau = commands.add_parser("cau-table", help="sequence models: every unlearning method "
                              "(CAU variants, ablations, Retrain) over backbones and seeds")
    cau.add_argument("--backbone", type=_names, default=("sasrec", "gru4rec"),
                     help="comma-separated: sasrec,gru4rec (default both)")
    cau.add_argument("--seeds", type=_seeds, default=(0, 1, 2),
                     help="split and run seeds (default 0,1,2)")
    cau.add_argument("--methods", type=_names, default=None,
                     help="comma-separated subset of the methods (default all)")
    cau.add_argument("--dataset", default="ml-100k")
    cau.add_argument("--data-path", default=None, help="folder of the dataset's files")
    cau.add_argument("--rounds", type=int, default=None,
                     help="federated rounds of the Original and Retrain (default 200)")
    cau.add_argument("--unlearn-epochs", type=int, default=None,
                     help="CAU epochs (default the paper's: SASRec 200, GRU4Rec 100)")
    cau.add_argument("--batch-size", type=int, default=16, help="CAU batch (default 16)")
    cau.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    cau.add_argument("--resume", metavar="FOLDER", help="finish a stopped cau-table folder")
    cau.add_argument("--report-only", action="store_true",
                     help="with --resume: report the finished cells, compute nothing")
    cau.add_argument("--out", default="runs")
    cau.set_defaults(func=_cmd_cau_table)

    tune = commands.add_parser("tune-unlearning", help="choose every unlearning method's "
                               "settings on validation, on tuning plans, same budget each")
    tune.add_argument("--plans", type=_plans, default=[(100, 100), (101, 101)],
                      metavar="SPLIT:PLAN,...", help="tuning plans of the config's dataset "
                      "(default 100:100,101:101); reported plans must not share their seeds")
    _add_plan_shape_args(tune)
    tune.add_argument("--budget", type=int, default=6,
                      help="candidate settings per method, the same for all (default 6)")
    tune.add_argument("--grids", help="TOML of the candidate settings (default "
                      "simulations/tuning_grids.toml)")
    tune.add_argument("--seed", type=int, default=0, help="learning seed of every tuning plan")
    tune.add_argument("--canaries", type=int, default=5,
                      help="common canary items per unsharing user (the forgetting score)")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a learning-phase setting")
    _add_unlearning_args(tune)
    tune.add_argument("--out", default="runs")
    tune.set_defaults(func=_cmd_tune_unlearning)

    privacy = commands.add_parser("privacy-audit", help="what the server can read of local "
                                  "interactions per deployment and defence, and each defence's "
                                  "cost")
    privacy.add_argument("--config", help="a config file, e.g. simulations/configs/fedshare.toml")
    privacy.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a learning setting (repeatable), e.g. --set rounds=50")
    privacy.add_argument("--users", type=int, default=200,
                         help="audited users per seed (default 200)")
    privacy.add_argument("--seeds", type=_seeds, default=(0, 1, 2),
                         help="split, plan and run seeds (default 0,1,2)")
    privacy.add_argument("--settings", type=_names, default=None,
                         help="comma-separated settings (default all: device, cohort-10, "
                         "secagg, secagg+hidden, non-marking, non-marking-256, ldp-0.03, "
                         "ldp-0.1, ldp-1; cohort-K for any K >= 2)")
    privacy.add_argument("--resume", metavar="FOLDER", help="finish a stopped audit folder")
    privacy.add_argument("--out", default="runs")
    privacy.set_defaults(func=_cmd_privacy_audit)

    rep = commands.add_parser("reproduce", help="every table and figure of the papers: runs, "
                              "CSVs, plots and a report beside the papers' numbers")
    rep.add_argument("target", choices=("table3", "table4", "fig4", "fig5", "cau", "all"),
                     help="FedShare's Table III, Table IV, Fig. 4, Fig. 5, CAU's Tables 1-4, "
                     "or all of them")
    rep.add_argument("--dataset", default="ml-100k", help=f"one of {', '.join(SOURCES)}")
    rep.add_argument("--path", help="local folder or file of the dataset in its publisher's "
                     "format (ML-1M, the Amazon categories)")
    rep.add_argument("--seeds", type=int, default=None,
                     help="reported seeds 0..N-1 (default 3; 1 with --quick)")
    rep.add_argument("--quick", action="store_true",
                     help="every figure's code on a tiny configuration (minutes; a smoke test, "
                     "not a result)")
    rep.add_argument("--tuning-plans", type=int, default=1, help="plans the settings are "
                     "chosen on: 1 = 100:100 (default), 2 = also 101:101")
    rep.add_argument("--workers", type=int, default=2, help="parallel cells (default 2)")
    rep.add_argument("--resume", metavar="FOLDER", help="finish a stopped reproduce folder "
                     "(finished cells are never recomputed)")
    rep.add_argument("--out", default="runs")
    rep.set_defaults(func=_cmd_reproduce)

    store = commands.add_parser("storage", help="storage and time of every unlearning method")
    store.add_argument("--seeds", type=_seeds, default=(0,))
    store.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a learning-phase setting")
    store.add_argument("--snapshots", type=_seeds, default=(1, 2, 3, 5, 10),
                       help="FedShare's M values (default 1,2,3,5,10)")
    store.add_argument("--alpha", type=float, default=0.5,
                       help="FRU: fraction of the candidate rows stored per round")
    store.add_argument("--beta", type=float, default=0.5,
                       help="FRU: candidate negatives per positive")
    store.add_argument("--pool", type=float, default=0.1,
                       help="FRU: R, the fraction of non-interacted items in each half of the "
                       "semi-hard pool")
    store.add_argument("--epoch-fraction", type=float, default=0.1,
                       help="FRU/CUFRU: lambda, the replay's share of epochs and steps")
    store.add_argument("--interval", type=int, default=10,
                       help="CUFRU: a calibration round every this many rounds")
    store.add_argument("--out", default="runs")
    store.set_defaults(func=_cmd_storage)

    audit = commands.add_parser("audit", help="erasure audit of a finished run: forgotten pairs, "
                                "local-only interactions, pre-request snapshots left anywhere")
    audit.add_argument("run_dir", metavar="RUN_DIR", help="a Flower run folder (with state.db)")
    audit.add_argument("--devices", help="folder of the deployed devices' files (ground truth "
                       "of a deployment; default: the run's own sharing plan)")
    audit.add_argument("--superlink", help="a deployment's SuperLink database to check too "
                       "(default: RUN_DIR/../superlink.db where it exists, as `fedshare deploy` "
                       "lays it out)")
    audit.set_defaults(func=_cmd_audit)

    dep = commands.add_parser("deploy", help="a TLS deployment on this machine: one "
                              "authenticated SuperNode per user device")
    _add_data_args(dep)
    dep.add_argument("--devices", type=int, default=4, help="how many user devices (default 4)")
    dep.add_argument("--dir", default="runs/deploy", help="new folder for credentials, device "
                     "files, logs and the run")
    dep.add_argument("--config", help="run settings file, as for 'fedshare run'")
    dep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a run setting, e.g. --set rounds=5")
    dep.add_argument("--timeout", type=float, default=3600, help="seconds the run may take")
    dep.set_defaults(func=_cmd_deploy)

    from simulations.bench import add_arguments

    bench = commands.add_parser("bench", help="speed and memory figures at ML-1M scale")
    add_arguments(bench)
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return int(exc.code or 0)
    try:
        with signals_interrupt():  # SIGTERM and SIGHUP unwind like Ctrl-C: cleanup code runs
            code = args.func(args)
    except FedShareError as exc:
        print(f"fedshare: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedshare: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
