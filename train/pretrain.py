"""Train an embedded MoE model on the Python stdlib (thin CLI over moe_env.pretrain).

Example:
    python train/pretrain.py --config train/configs/tiny-mixtral.json --out moe_env/assets/models/tiny-mixtral
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_env.error_boundary import run_reporting_errors
from moe_env.errors import UsageError
from moe_env.pretrain import TrainConfig, train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="pretrain.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="JSON training config (see moe_env.pretrain.TrainConfig)")
    p.add_argument("--out", required=True, help="directory for the final HF model + tokenizer + train_meta.json")
    p.add_argument("--steps", type=int, help="override the number of training steps")
    p.add_argument("--seed", type=int, help="override the seed")
    p.add_argument("--run-dir", help="checkpoint/tokenizer cache directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the run dir")
    p.add_argument("--threads", type=int, help="override torch.set_num_threads (config num_threads, default 2)")
    p.add_argument("--stop-after", type=int, help="checkpoint and exit after this many steps (to test --resume)")
    args = p.parse_args(argv)
    return run_reporting_errors("pretrain.py", lambda: run(args))


def run(args: argparse.Namespace) -> int:
    for option, value in (("--steps", args.steps), ("--threads", args.threads), ("--stop-after", args.stop_after)):
        if value is not None and value < 1:
            raise UsageError(f"{option} must be >= 1, got {value}")
    cfg = TrainConfig.from_file(args.config)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.seed is not None:
        cfg.seed = args.seed
    if args.threads is not None:
        cfg.num_threads = args.threads
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name
    train(cfg, args.out, run_dir, resume=args.resume, stop_after=args.stop_after, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
