"""`aphro worker --connect HOST:PORT`: one tensor-parallel rank for a driver on another machine
(started by torchrun on every machine; README, "Several machines")."""

from __future__ import annotations

import click


@click.command()
@click.option("--connect", "address", required=True, metavar="HOST:PORT",
              help="The driver's worker_address (--worker-address).")
def worker(address):
    """Serve one tensor-parallel rank (RANK, WORLD_SIZE, LOCAL_RANK from torchrun) to the driver
    at HOST:PORT; APHRO_WORKER_KEY must hold the driver's key."""
    from engine.distributed.worker import main

    main(address)
