"""Env throughput: replay env steps/s (constant, heuristic and learned actions) and PPO training steps/s.

    python bench/env_speed.py [--trace SPEC] [--profile P] [--repeats 5] [--ppo-steps 8192] [--vector 16x1,64x2]

Medians over repeats, printed side by side. Default trace: builtin:tiny-mixtral/train when shipped, else the
shared Mixtral routing log (../shared/traces) with the mixtral-8x7b-4bit expert profile. The vector env rows
(``--vector LANESxPROCESSES,...``) run each shape on both of its paths in the same run: ``envs`` (one single env
per lane, what it was) and ``arrays`` (moe_env.lane_env: all lanes in one compiled call per step).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from moe_env.agents.ppo import PPOConfig
from moe_env.agents.ppo_train import train_ppo
from moe_env.agents.traces import load_traces

from moe_env.env import MoEOffloadEnv, action_from_policy

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mixtral-8x7b-gsm8k-routing.jsonl"


def default_trace() -> tuple[str, str | None]:
    from moe_env.trace import builtin_trace_names

    if "tiny-mixtral" in builtin_trace_names():
        return "builtin:tiny-mixtral/train", None
    return str(SHARED), "consumer-pcie4:mixtral-8x7b-4bit"


def steps_per_s(env: MoEOffloadEnv, choose, min_steps: int) -> tuple[float, float]:
    """(steps per wall second, steps per CPU second of this process: what an idle core would give)."""
    steps, start, cpu = 0, time.perf_counter(), time.process_time()
    while steps < min_steps:
        obs, _ = env.reset(options={"sequence": steps % len(env.trace.sequences)})
        done = False
        while not done:
            obs, _, done, _, _ = env.step(choose(obs, env))
            steps += 1
    return steps / (time.perf_counter() - start), steps / (time.process_time() - cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", default=None)
    p.add_argument("--profile", default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-steps", type=int, default=20_000)
    p.add_argument("--ppo-steps", type=int, default=8192)
    p.add_argument("--vector", default="16x1,64x1,256x1,64x2,256x2",
                   help="vector env rows LANESxPROCESSES, comma-separated (each on both paths)")  # fmt: skip
    p.add_argument("--vector-only", action="store_true", help="only the vector env rows")
    args = p.parse_args()
    torch.set_num_threads(1)
    spec, profile = (args.trace, args.profile) if args.trace else default_trace()
    trace = load_traces(spec)
    env = MoEOffloadEnv(trace, profile=args.profile or profile, reference_metrics=False)
    action = np.full(env.action_space.shape, -0.5, dtype=np.float32)
    actors = {
        "constant action": lambda obs, e: action,
        "lru via action_from_policy": lambda obs, e: action_from_policy(e.policy.fallback, e.current_event, e.cache),
    }
    from moe_env.trace import builtin_trace_names

    if "tiny-mixtral" in builtin_trace_names() and trace.meta.model == "tiny-mixtral":
        from moe_env.policy import make_policy

        for kind in ("ppo", "flat-predictor"):
            learned = make_policy(kind)
            if not hasattr(learned, "act"):  # the shipped ppo is the eviction scorer: it acts on candidates, not here
                continue
            learned.reset(env.model_spec, env.capacity)
            actors[f"{kind} (shipped)"] = lambda obs, e, p=learned: p.act(obs, e.current_event, e.cache)
    print(f"trace {spec}: {trace.meta.model}, {len(trace.sequences)} sequences, capacity {env.capacity}")
    print("medians over repeats; CPU = steps per CPU-second of this process (what an idle core gives)")
    print(f"{'actor':32s} {'wall steps/s':>13s} {'CPU steps/s':>12s} {'wall min':>9s} {'wall max':>9s}")
    if args.vector_only:
        actors = {"constant action": actors["constant action"]}
    for name, choose in actors.items():
        rates = [steps_per_s(env, choose, args.min_steps) for _ in range(args.repeats)]
        wall, cpu = [r[0] for r in rates], [r[1] for r in rates]
        print(
            f"{name:32s} {statistics.median(wall):13.0f} {statistics.median(cpu):12.0f} {min(wall):9.0f} "
            f"{max(wall):9.0f}"
        )
    vector_rows(trace, args, profile, action)
    if args.vector_only:
        return
    import tempfile

    wall, cpu = [], []
    validation = type(trace)(trace.meta, trace.sequences[:2])  # the start/end evaluations stay small
    for repeat in range(max(1, args.repeats // 2)):
        config = PPOConfig(
            total_timesteps=args.ppo_steps, eval_every=10**9, seed=repeat, profile=args.profile or profile
        )
        with tempfile.TemporaryDirectory() as run_dir:
            start, start_cpu = time.perf_counter(), time.process_time()
            train_ppo(config, trace, validation, Path(run_dir), log=lambda _: None)
            wall.append(args.ppo_steps / (time.perf_counter() - start))
            cpu.append(args.ppo_steps / (time.process_time() - start_cpu))
    print(
        f"{'PPO training (default config)':32s} {statistics.median(wall):13.0f} {statistics.median(cpu):12.0f} "
        f"{min(wall):9.0f} {max(wall):9.0f}"
    )


def vector_rows(trace, args: argparse.Namespace, profile: str | None, action: np.ndarray) -> None:
    """The vectorised env (moe_env.vector_env) with the constant action: aggregate steps/s over its lanes, on
    both paths. CPU: steps per CPU-second of this process (os.times counts worker processes only
    once they are reaped, so the workers' CPU is not shown)."""
    from moe_env.vector_env import ReplayVectorEnv

    shapes = [(int(x), int(y)) for x, y in (c.split("x") for c in args.vector.split(","))]
    for num_envs, workers in shapes:
        for path in ("envs", "arrays"):
            vector = ReplayVectorEnv(num_envs, workers, path=path, trace=trace, profile=args.profile or profile,
                                     reference_metrics=False)  # fmt: skip
            actions = np.repeat(action[None, :], num_envs, axis=0)
            rates, cpus = [], []
            try:
                vector.reset(seed=0)
                # every sequence prepared before timing (the single env's rows cycle through all of them)
                warm = 3 * sum(s.num_steps for s in trace.sequences) * trace.meta.num_layers
                for _ in range(0, warm, num_envs):
                    vector.step(actions)
                for _ in range(args.repeats):
                    steps, start, cpu = 0, time.perf_counter(), time.process_time()
                    while steps < args.min_steps:
                        vector.step(actions)
                        steps += num_envs
                    rates.append(steps / (time.perf_counter() - start))
                    cpus.append(steps / max(time.process_time() - cpu, 1e-9))
            finally:
                vector.close()
            name = f"vector {num_envs} lanes, {workers} proc, {path}"
            cpu = f"{statistics.median(cpus):12.0f}" if workers == 1 else f"{'-':>12s}"  # workers' CPU is not ours
            print(f"{name:32s} {statistics.median(rates):13.0f} {cpu} {min(rates):9.0f} {max(rates):9.0f}")


if __name__ == "__main__":
    main()
