"""A MongoDB-wire-compatible server (mongoeco) for tests and the local demo. Runs on Python >= 3.13.

    .venv-mongo/bin/python tools/mongo_wire_server.py [--port 27017] [--engine memory|sqlite]

Prints ``READY mongodb://host:port/?directConnection=true`` once it accepts connections.
Memory engine with the aggregation materialisation limit lifted (count_documents over 50k docs).
"""

import argparse
import asyncio
import signal
import sys

from mongoeco.engines.memory import MemoryEngine
from mongoeco.engines.sqlite import SQLiteEngine
from mongoeco.wire.proxy import AsyncMongoEcoProxyServer


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=("memory", "sqlite"), default="memory")
    ap.add_argument("--path", default="mongoeco.sqlite")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port (printed in READY)")
    a = ap.parse_args()
    engine = (
        MemoryEngine(aggregation_materialization_limit=None)
        if a.engine == "memory"
        else SQLiteEngine(a.path, aggregation_materialization_limit=None)
    )
    proxy = AsyncMongoEcoProxyServer(engine=engine, host=a.host, port=a.port, mongodb_dialect="7.0")
    stop = asyncio.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(s, stop.set)
    addr = await proxy.start()
    print(f"READY mongodb://{addr.host}:{addr.port}/?directConnection=true", flush=True)
    try:
        await stop.wait()
    finally:
        await proxy.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
