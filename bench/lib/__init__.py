"""What the benchmark programs share: child processes and /proc readings (`procs`), numbers
and tables (`numbers`), raw-socket HTTP clients (`loadclients`), the stub, the proxy and
LiteLLM as targets (`targets`), the machine and its tools (`environment`), py-spy (`pyspy`)."""

from functools import partial
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
ROOT = BENCH.parent
OUT = BENCH / "out"
say = partial(print, flush=True)
