"""Command line: `python -m detr_fast {train,eval,make-shapes,info,validate,bench}` (console script `detr-fast`).

    detr-fast train --config configs/shapes.yaml --set train.epochs=3 --set data.batch_size=16
    torchrun --nproc_per_node=8 -m detr_fast train --config configs/detr_r50_coco.yaml
    detr-fast eval --config configs/detr_r50_coco.yaml --checkpoint detr-r50-e632da11.pth
    detr-fast make-shapes --out data/shapes
    detr-fast info
    detr-fast validate --device cuda
    detr-fast bench --device cuda --ops attention
"""
from __future__ import annotations

import argparse
import sys


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config file (configs/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set train.epochs=3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detr-fast", description="DETR training engine with fused kernels")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (and evaluate) a DETR; run under torchrun for several processes")
    _add_config_args(p)

    p = sub.add_parser("eval", help="COCO evaluation of a checkpoint (official DETR or detr_fast)")
    _add_config_args(p, required=False)
    p.add_argument("--checkpoint", required=True, help="weights file to evaluate")
    p.add_argument("--output", default=None, help="JSON file for the AP numbers (default output_dir/eval.json)")

    p = sub.add_parser("make-shapes", help="render the synthetic shapes dataset (JPEGs + COCO JSON)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=4000, help="number of training images")
    p.add_argument("--val", type=int, default=500, help="number of validation images")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, default=4, help="number of shape classes (1-6)")
    p.add_argument("--workers", type=int, default=0, help="rendering processes (0: one per CPU core)")

    sub.add_parser("info", help="versions, CUDA availability and the backends of every op")

    p = sub.add_parser("validate", help="check every op against its reference on fresh random inputs")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--ops", nargs="*", default=None, help="only these ops")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("bench", help="kernel microbenchmarks (reference, torch.compile(reference), ours)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--ops", nargs="*", default=None, help="only these ops")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    return parser


def _check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")


def cmd_train(args) -> int:
    from detr_fast.config import load_config
    from detr_fast.engine import train

    cfg = load_config(args.config, args.overrides)
    train(cfg)
    from detr_fast import dist

    dist.cleanup()
    return 0


def cmd_eval(args) -> int:
    from detr_fast import dist
    from detr_fast.config import load_config
    from detr_fast.engine import evaluate_checkpoint

    cfg = load_config(args.config, args.overrides) if args.config else None
    evaluate_checkpoint(cfg, args.checkpoint, overrides=args.overrides, output=args.output)
    dist.cleanup()
    return 0


def cmd_make_shapes(args) -> int:
    from detr_fast.data.synthetic import make_shapes

    make_shapes(args.out, args.train, args.val, args.size, args.seed, num_classes=args.classes, workers=args.workers)
    print(f"shapes dataset written to {args.out}")
    return 0


def cmd_info(args) -> int:
    import platform

    import torch

    import detr_fast
    from detr_fast.bench import format_table
    from detr_fast.ops import backends, extension_loaded

    print(f"detr_fast {detr_fast.__version__} ({detr_fast.__file__})")
    print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA build {torch.version.cuda}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"CUDA available: yes ({torch.cuda.device_count()} device(s): {names})")
    else:
        print("CUDA available: no")
    loaded = extension_loaded()
    table = backends()
    cuda_built = any("cuda" in b for b in table.values())
    print(f"extension detr_fast._C: {'built' if loaded else 'not built (every op runs its reference)'}; "
          f"CUDA kernels compiled: {'yes' if cuda_built else 'no'}")
    rows = [{"op": op, "backends": ", ".join(b)} for op, b in table.items()]
    print(format_table(rows, ["op", "backends"]))
    return 0


def cmd_validate(args) -> int:
    from detr_fast.bench import environment, format_table
    from detr_fast.ops.registry import run_all

    _check_device(args.device)
    results = run_all(args.device, ops=args.ops, seed=args.seed)
    print(environment(args.device))
    rows = [{"op": r.op, "case": r.case, "dtype": r.dtype, "max error": r.error, "tolerance": r.tolerance,
             "result": "pass" if r.passed else "FAIL", "message": r.message or None} for r in results]
    columns = ["op", "case", "dtype", "max error", "tolerance", "result"]
    if any(r.message for r in results):
        columns.append("message")
    print(format_table(rows, columns))
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed" + ("" if results else " (no validation cases registered)"))
    return 1 if failed else 0


def cmd_bench(args) -> int:
    import torch

    from detr_fast.bench import BENCH_COLUMNS, environment, format_table, run_op_benchmarks

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_device(device)
    print(environment(device))
    rows = run_op_benchmarks(device, ops=args.ops, compile_ref=not args.no_compile, iters=args.iters)
    print(format_table(rows, BENCH_COLUMNS))
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "make-shapes": cmd_make_shapes, "info": cmd_info,
            "validate": cmd_validate, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from detr_fast.checkpoint import CheckpointError
    from detr_fast.config import ConfigError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, CheckpointError, FileNotFoundError) as exc:
        print(f"detr-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
