"""Bugs and failures planted in tensor-parallel worker processes, for tests/test_tp.py.

Workers are separate processes, so a test cannot patch them from its own. `plant_in_workers`
writes a `sitecustomize.py` (which Python imports at start-up from the first folder of its path
that has one) into a temporary folder put first on the path the workers inherit; it calls
`apply(APHRO_TEST_PLANT)` here. Only processes started afterwards see it: the test's own
process, and the TP=1 reference inside it, stay clean.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV = "APHRO_TEST_PLANT"

SITECUSTOMIZE = f"""
import os, sys
if os.environ.get({ENV!r}):
    sys.path.insert(0, {str(HERE)!r})
    import tp_plants
    tp_plants.apply(os.environ[{ENV!r}])
"""


def plant_in_workers(monkeypatch, tmp_path: Path, name: str) -> None:
    folder = tmp_path / "plant"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv(ENV, name)


def _rank() -> int:
    return int(os.environ.get("RANK", "-1"))


# -- loader bugs (every rank) -------------------------------------------------------------------
def _row_wrong_dim() -> None:
    from engine.layers.linear import RowParallelLinear, load_shard

    old = RowParallelLinear.weight_loader

    def loader(self, param, loaded, shard_id=None):
        if param.dim() == 2 and loaded.shape[0] == loaded.shape[1]:  # square: no shape error
            load_shard(param.data, loaded.t(), 1, self.tp_rank, self.input_size)
        else:
            old(self, param, loaded, shard_id)

    RowParallelLinear.weight_loader = loader


def _merged_wrong_rank() -> None:
    from engine.layers.linear import MergedColumnParallelLinear, load_shard

    old = MergedColumnParallelLinear.weight_loader

    def loader(self, param, loaded, shard_id=None):
        if shard_id != 1:
            return old(self, param, loaded, shard_id)
        tp, full = self.tp_size, self.output_sizes[1]
        load_shard(param.data.narrow(0, self.output_sizes[0] // tp, full // tp), loaded, 0,
                   tp - 1 - self.tp_rank, full)

    MergedColumnParallelLinear.weight_loader = loader


def _vocab_padding() -> None:
    from engine.layers.vocab_embedding import VocabParallelEmbedding

    old = VocabParallelEmbedding.weight_loader

    def loader(self, param, loaded, shard_id=None):
        old(self, param, loaded, shard_id)
        rows = max(0, min(self.vocab_end, self.num_embeddings) - self.vocab_start)
        param.data[rows:] = 1.0

    VocabParallelEmbedding.weight_loader = loader


# -- rank-specific --------------------------------------------------------------------------------
def _few_blocks_on_rank_1() -> None:
    from engine.runner.model_runner import ModelRunner

    if _rank() == 1:
        ModelRunner.available_kv_blocks = lambda self: 7


def _raise_on_rank_1() -> None:
    from engine.runner.model_runner import ModelRunner

    if _rank() == 1:
        def execute(self, batch):
            raise ValueError("planted failure in rank 1's step")

        ModelRunner.execute = execute


def _rank_0_blocks_rank_1_raises() -> None:
    """Rank 1 raises in its step while rank 0 is stuck inside its own (as a rank waiting on the
    GPU behind a collective that needs rank 1 would be)."""
    from engine.runner.model_runner import ModelRunner

    if _rank() == 1:
        _raise_on_rank_1()
    elif _rank() == 0:
        ModelRunner.execute = lambda self, batch: time.sleep(600)


PLANTS = {"row_wrong_dim": _row_wrong_dim, "merged_wrong_rank": _merged_wrong_rank,
          "vocab_padding": _vocab_padding, "few_blocks_on_rank_1": _few_blocks_on_rank_1,
          "raise_on_rank_1": _raise_on_rank_1,
          "rank_0_blocks_rank_1_raises": _rank_0_blocks_rank_1_raises}


def apply(name: str) -> None:
    if _rank() >= 0:  # a tensor-parallel worker
        PLANTS[name]()
