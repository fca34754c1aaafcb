"""moe-env: Mixture-of-Experts expert offloading with learned cache and prefetch policies."""

__version__ = "0.1.0"

ENV_ID = "moe_env/MoEOffload-v0"
EVICTION_ENV_ID = "moe_env/EvictionDecision-v0"  # one step per eviction, candidate feature rows (agents/)


def _register_envs() -> None:
    """Make ``gymnasium.make("moe_env/MoEOffload-v0")`` work after ``import moe_env`` (the env loads lazily)."""
    try:
        import gymnasium
    except ImportError:  # the env is optional for the engine's users
        return
    if ENV_ID not in gymnasium.registry:
        # make_vec(ENV_ID, num_envs=N[, workers=W]) batches replay lanes (moe_env.vector_env)
        gymnasium.register(
            id=ENV_ID, entry_point="moe_env.env:make_env", vector_entry_point="moe_env.vector_env:ReplayVectorEnv"
        )
    if EVICTION_ENV_ID not in gymnasium.registry:
        gymnasium.register(id=EVICTION_ENV_ID, entry_point="moe_env.agents.eviction_env:EvictionDecisionEnv")


_register_envs()
