"""moe-env: Mixture-of-Experts expert offloading with learned cache and prefetch policies."""

__version__ = "0.1.0"

ENV_ID = "moe_env/MoEOffload-v0"


def _register_envs() -> None:
    """Make ``gymnasium.make("moe_env/MoEOffload-v0")`` work after ``import moe_env`` (the env loads lazily)."""
    try:
        import gymnasium
    except ImportError:  # the env is optional for the engine's users
        return
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point="moe_env.env:make_env")


_register_envs()
