"""A stateful fake of the TensorDock v0 marketplace API.

`SimulatedMarket` contains the state (hostnodes, VMs, balance, spot prices, faults),
`create_app()` serves it as the v0 API with Starlette, `serve()` runs that app with
uvicorn on loopback, and `tdbot.simulator.testing` wraps this for tests.
"""

from tdbot.simulator.clock import SimClock
from tdbot.simulator.errors import SimApiError
from tdbot.simulator.faults import FaultMode
from tdbot.simulator.market import SimulatedMarket

__all__ = ["FaultMode", "SimApiError", "SimClock", "SimulatedMarket"]
