"""Simulated xffuw, Fengyuan and OpenAI-compatible servers: the tests run against all three,
`proxy demo` against xffuw and Fengyuan."""

from proxy.sim.faults import Call, FaultMiddleware, Faults, Markers, parse_markers
from proxy.sim.fengyuan import (
    FENGYUAN_DEMO_KEYS,
    FengyuanKey,
    FengyuanService,
    FengyuanSim,
    create_fengyuan_app,
)
from proxy.sim.openai_compat import (
    OPENAI_COMPAT_DEMO_KEYS,
    CompatModel,
    OpenAICompatSim,
    create_openai_compat_app,
)
from proxy.sim.xffuw import XFFUW_DEMO_KEYS, XffuwModel, XffuwSim, create_xffuw_app

__all__ = [
    "FENGYUAN_DEMO_KEYS",
    "OPENAI_COMPAT_DEMO_KEYS",
    "XFFUW_DEMO_KEYS",
    "Call",
    "CompatModel",
    "FaultMiddleware",
    "Faults",
    "FengyuanKey",
    "FengyuanService",
    "FengyuanSim",
    "Markers",
    "OpenAICompatSim",
    "XffuwModel",
    "XffuwSim",
    "create_fengyuan_app",
    "create_openai_compat_app",
    "create_xffuw_app",
    "parse_markers",
]
