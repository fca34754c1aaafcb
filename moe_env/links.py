"""Host-to-device link profiles that the CPU copy engine paces copies to (no torch: the CLI lists them in its help)."""

from __future__ import annotations

from dataclasses import dataclass

from moe_env.errors import UsageError


@dataclass(frozen=True)
class LinkModel:
    """A host-to-device link; bandwidth_gbps <= 0 means no pacing (copies run at memory speed)."""

    name: str
    bandwidth_gbps: float
    latency_s: float = 0.0

    @property
    def paced(self) -> bool:
        return self.bandwidth_gbps > 0

    def copy_seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / (self.bandwidth_gbps * 1e9) if self.paced else 0.0


LINKS: dict[str, LinkModel] = {
    "none": LinkModel("none", 0.0),
    "host": LinkModel("host", 0.0),
    "pcie3": LinkModel("pcie3", 12.0, 10e-6),
    "pcie4": LinkModel("pcie4", 25.0, 10e-6),
    "pcie5": LinkModel("pcie5", 50.0, 10e-6),
    "nvme": LinkModel("nvme", 3.5, 80e-6),
}


def link_by_name(name: str) -> LinkModel:
    if name not in LINKS:
        raise UsageError(f"unknown link {name!r}; known links: {', '.join(LINKS)}")
    return LINKS[name]
