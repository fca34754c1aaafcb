"""Heuristic cache and prefetch policies, registered as plug-ins under the entry-point group moe_env.policies."""
