"""`ivonserve serve | train | prepare-model | posterior inspect|set-ess|import | sample | bench`.

Each subcommand parses its flags here and calls one function of its module; user errors
(IvonserveError) print as one line on stderr with exit code 2, never as a stack trace.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import typing
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from ivonserve.errors import IvonserveError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except IvonserveError as err:
        print(f"ivonserve: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ivonserve", description="Test-time scaling with Bayesian (IVON) LoRA on vLLM."
    )
    commands = parser.add_subparsers(title="commands")
    _add_serve(commands)
    _add_serve_ray(commands)
    _add_train(commands)
    _add_prepare_model(commands)
    _add_posterior(commands)
    _add_sample(commands)
    _add_bench(commands)
    return parser


def _command(commands, name: str, run: Callable, help: str) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help, description=help)
    sub.set_defaults(run=run)
    return sub


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="a transformers model folder (default: the embedded SmolLM2-135M)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="where the embedded model is converted to (default: "
        "$IVONSERVE_CACHE_DIR or ~/.cache/ivonserve)",
    )


def _add_serve(commands) -> None:
    from ivonserve import config

    sub = _command(commands, "serve", _run_serve, "serve posterior draws with MBR consensus")
    config.add_cli_arguments(sub)


def _run_serve(args: argparse.Namespace) -> int:
    from ivonserve import config, server

    return server.serve(config.Settings.from_cli(args))


def _add_serve_ray(commands) -> None:
    from ivonserve import config

    sub = _command(
        commands,
        "serve-ray",
        _run_serve_ray,
        "serve replicas on a Ray cluster (Ray Serve): a local one, or RAY_ADDRESS's",
    )
    replicas = sub.add_argument_group("replicas")
    replicas.add_argument("--replicas", dest="num_replicas", type=int, help="fixed count (1)")
    replicas.add_argument("--min-replicas", type=int, help="autoscaling: at least")
    replicas.add_argument("--max-replicas", type=int, help="autoscaling: at most")
    replicas.add_argument("--num-cpus", type=float, help="CPUs per replica (default 1)")
    replicas.add_argument("--num-gpus", type=float, help="GPUs per replica (default 0)")
    replicas.add_argument("--ray-address", help="an existing cluster (default: RAY_ADDRESS)")
    config.add_cli_arguments(sub)


def _run_serve_ray(args: argparse.Namespace) -> int:
    from ivonserve import config
    from ivonserve.ray_serve import REPLICA_KEYS, serve_ray

    replicas = {k: getattr(args, k) for k in REPLICA_KEYS if getattr(args, k) is not None}
    return serve_ray(config.Settings.from_cli(args), replicas, args.ray_address)


def _add_train(commands) -> None:
    from ivonserve.train import TrainConfig

    sub = _command(commands, "train", _run_train, "IVON-LoRA finetuning that writes a posterior")
    defaults = TrainConfig(data="", out="")
    hints = typing.get_type_hints(TrainConfig)
    sub.add_argument(
        "--data",
        required=True,
        help="jsonl: question/answer (GSM8k) or question/choices/label (multiple choice)",
    )
    sub.add_argument("--out", required=True, help="posterior folder to write (and resume from)")
    _add_model_flags(sub)
    for f in fields(TrainConfig):
        if f.name in ("data", "out", "model"):
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            sub.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, list):
            sub.add_argument(flag, nargs="+", default=default, help=f"default: {default}")
        elif typing.get_origin(hints[f.name]) is typing.Literal:
            values = typing.get_args(hints[f.name])
            sub.add_argument(flag, choices=values, default=default, help=f"default: {default}")
        else:
            kind = float if isinstance(default, float) or f.name == "lr" else int
            sub.add_argument(flag, type=kind, default=default, help=f"default: {default}")
    sub.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_train(args: argparse.Namespace) -> int:
    from ivonserve.model import resolve_model
    from ivonserve.train import TrainConfig, train

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    config = TrainConfig(**values)
    out = train(config, resolve_model(args.model, args.cache_dir), progress=not args.no_progress)
    print(f"wrote {out}")
    return 0


def _add_prepare_model(commands) -> None:
    sub = _command(
        commands, "prepare-model", _run_prepare_model, "convert the embedded model once (cached)"
    )
    _add_model_flags(sub)


def _run_prepare_model(args: argparse.Namespace) -> int:
    from ivonserve.model import resolve_model

    print(resolve_model(args.model, args.cache_dir))
    return 0


def _add_posterior(commands) -> None:
    sub = commands.add_parser(
        "posterior", help="inspect a posterior folder, set its ess, or import one"
    )
    actions = sub.add_subparsers(title="actions")
    inspect = _command(actions, "inspect", _run_inspect, "ess, sizes, sigma and SNR statistics")
    inspect.add_argument("dir", type=Path)
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    set_ess = _command(
        actions,
        "set-ess",
        _run_set_ess,
        "sample at another spread: rewrite posterior.json's ess (sigma^2 = 1 / (ess (h + weight "
        "decay))); the weights stay, and a trained posterior keeps its training ess in "
        "training.config.ess",
    )
    set_ess.add_argument("dir", type=Path)
    set_ess.add_argument("ess", type=float, help="the new ess (> 0; inf: every draw is the mean)")
    _add_posterior_import(actions)


def _add_posterior_import(actions) -> None:
    from ivonserve.choices import FORMS

    sub = actions.add_parser(
        "import",
        help="a posterior from a PEFT adapter and an ivon-opt IVON state trained elsewhere",
        description="Write an ivonserve posterior folder from a PEFT LoRA adapter folder (the "
        "mean) and ivon-opt's IVON optimizer state (its flat per-group hess): a file saved with "
        "torch.save(optimizer.state_dict(), ...), or a transformers.Trainer checkpoint folder "
        "holding the adapter and optimizer.pt. The parameter order of the flat hess is rebuilt "
        "from the adapter config on the meta device (only the base model's config.json is "
        "read). Tested here (ivon-opt 0.1.3, peft 0.21, transformers 5.19): tiny Llama and "
        "Qwen2 models, one and two parameter groups, a training loop's state and a Trainer "
        "checkpoint; the folder equals save_posterior's of the same model byte for byte.",
    )
    sub.set_defaults(run=_run_posterior_import)
    sub.add_argument("adapter", type=Path, help="PEFT adapter folder or Trainer checkpoint")
    sub.add_argument("--out", type=Path, required=True, help="the posterior folder to write")
    sub.add_argument(
        "--optimizer",
        type=Path,
        help="the optimizer state file (default: ADAPTER/optimizer.pt, a Trainer checkpoint's)",
    )
    sub.add_argument(
        "--base-model",
        help="a transformers folder or Hugging Face name: its config.json gives the parameter "
        "order, and posterior.json records the name (default: the adapter config's "
        "base_model_name_or_path)",
    )
    sub.add_argument("--ess", type=float, help="sample at this ess instead of the state's (> 0)")
    sub.add_argument(
        "--mc-form",
        choices=FORMS,
        help="record that it was trained on multiple choice answered in this form: "
        "/score/choices and bench mc default to it",
    )


def _run_posterior_import(args: argparse.Namespace) -> int:
    from ivonserve.posterior import Posterior
    from ivonserve.posterior_import import import_posterior

    if args.ess is not None and not args.ess > 0:
        raise IvonserveError(f"--ess: must be > 0, got {args.ess}")
    out = import_posterior(
        args.adapter,
        args.out,
        optimizer_state=args.optimizer,
        base_model=args.base_model,
        ess=args.ess,
        mc_form=args.mc_form,
    )
    posterior = Posterior.load(out)
    groups = len(posterior.training["ivon_param_groups"])
    print(
        f"wrote {out}: {posterior.num_params} parameters from {groups} IVON group(s), "
        f"ess {posterior.ess:g}, base model {posterior.base_model}"
    )
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from ivonserve.posterior import Posterior

    stats = Posterior.load(args.dir).stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"posterior {args.dir}")
    for key in ("base_model", "ess", "weight_decay", "rank", "target_modules", "num_params"):
        print(f"  {key:<16} {stats[key]}")
    print(f"  {'':<24}" + "".join(f"{q:>11}" for q in ("min", "median", "max")))
    rows = {"sigma (all)": stats["sigma"], "snr |m|/sigma": stats["snr"]}
    rows |= {f"sigma {k}": v for k, v in stats["sigma_by_module"].items()}
    for name, q in rows.items():
        print(f"  {name:<24}" + "".join(f"{q[k]:>11.4g}" for k in ("min", "median", "max")))
    return 0


def _run_set_ess(args: argparse.Namespace) -> int:
    from ivonserve.posterior import Posterior

    if not args.ess > 0:
        raise IvonserveError(f"ess: must be > 0, got {args.ess}")
    posterior = Posterior.load(args.dir)
    replace(posterior, ess=args.ess).save_metadata(args.dir)
    factor = math.sqrt(posterior.ess / args.ess)
    print(f"{args.dir}: ess {posterior.ess:g} -> {args.ess:g} (every sigma x {factor:.4g})")
    return 0


def _add_sample(commands) -> None:
    from ivonserve.sampler import PRUNE_BY, SamplerConfig

    defaults = SamplerConfig()
    sub = _command(
        commands,
        "sample",
        _run_sample,
        "write draw d of a posterior's pool as a PEFT adapter: the bytes a server with the same "
        "--pool-seed, posterior temperature and pruning serves as its draw d",
    )
    sub.add_argument("dir", type=Path, help="posterior folder")
    sub.add_argument("--draw", type=int, required=True, help="d: the draw's index in the pool")
    sub.add_argument("--pool-seed", type=int, default=0, help="the pool's seed (default: 0)")
    sub.add_argument(
        "--posterior-temperature",
        type=float,
        default=defaults.posterior_temperature,
        help="posterior temperature T: the draws' variance is T*sigma^2; 0: the mean "
        f"(default: {defaults.posterior_temperature})",
    )
    sub.add_argument(  # its old name, not the decoding temperature
        "--temperature",
        dest="posterior_temperature",
        type=float,
        action=_DeprecatedFlag,
        help=argparse.SUPPRESS,
    )
    sub.add_argument(
        "--prune",
        type=float,
        default=defaults.prune,
        help=f"fraction of entries to zero (default: {defaults.prune})",
    )
    sub.add_argument("--prune-by", choices=PRUNE_BY, default=defaults.prune_by)
    sub.add_argument("--out", type=Path, required=True, help="adapter folder to write")


def _run_sample(args: argparse.Namespace) -> int:
    from ivonserve.posterior import Posterior
    from ivonserve.sampler import Sampler, SamplerConfig

    if args.draw < 0:
        raise IvonserveError(f"--draw: a pool index is >= 0, got {args.draw}")
    config = SamplerConfig(args.posterior_temperature, args.prune, args.prune_by)
    sampler = Sampler(Posterior.load(args.dir), config)
    print(sampler.write_draw(args.draw, args.pool_seed, args.out))
    return 0


class _DeprecatedFlag(argparse.Action):
    """An old flag, still accepted: stores its new one, with one deprecation line on stderr."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        new = "--" + self.dest.replace("_", "-")
        print(f"ivonserve: warning: {option} is deprecated; use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_bench(commands) -> None:
    from ivonserve.bench import compare, gsm8k, likelihood, mc, tts

    sub = commands.add_parser("bench", help="benchmarks against a running server")
    kinds = sub.add_subparsers(title="benchmarks")
    benches = (
        ("gsm8k", gsm8k),
        ("likelihood", likelihood),
        ("mc", mc),
        ("compare", compare),
        ("tts", tts),
    )
    for name, module in benches:
        summary = " ".join(module.__doc__.split("\n\n")[0].split())
        module.add_cli_arguments(_command(kinds, name, module.run_cli, summary))


if __name__ == "__main__":
    sys.exit(main())
