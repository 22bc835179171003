"""Every conformance check, by section: importing the check modules registers them.

Kept apart from conformance/registry.py, which the check modules import, so that the registry
never imports them back (no import cycle).
"""

from __future__ import annotations

# Registration order is the order the checks run and print in: transport (flow control and
# keepalive after the others), node, DHT, weights.
from biopetals.conformance import checks_transport  # noqa: F401, I001 (registers)
from biopetals.conformance import checks_flow  # noqa: F401 (registers)
from biopetals.conformance import checks_node  # noqa: F401 (registers)
from biopetals.conformance import checks_rollback  # noqa: F401 (registers)
from biopetals.conformance import checks_keepalive  # noqa: F401 (registers)
from biopetals.conformance import checks_dht  # noqa: F401 (registers)
from biopetals.conformance import checks_weights  # noqa: F401 (registers)
from biopetals.conformance.registry import REGISTRY, Check

__all__ = ["checks_for"]


def checks_for(section: str) -> list[Check]:
    """Registered checks of one section ("all": every one), in registration order."""
    return [c for c in REGISTRY.values() if section == "all" or c.section == section]
