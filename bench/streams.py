"""Streamed chat (`stream: true`) one after another on one connection: the time to the first
body bytes holding `data:` (p50 / p99) and to the complete stream (bench/README.md, 3).

    .venv/bin/python bench/streams.py [--quick] [--target direct --target proxy-1w …]
"""

import sequential

if __name__ == "__main__":
    raise SystemExit(sequential.main(stream=True, doc=__doc__))
