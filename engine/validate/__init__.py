"""Validation: is an engine model right? Parity against HF transformers, localization of the
first diverging sub-layer, the sharding check across tensor-parallel ranks, and the tiny
random-weight checkpoints they run on. It sees the engine only through the public API and the
model runner's observer hook.

    parity.py     run_parity: the engine (batched, chunked, decode) vs HF on one checkpoint
    compare.py    the HF reference (generate, teacher-forced logits) and the comparison
    localize.py   stage-by-stage localization and the load hints
    report.py     CheckPlan, EngineRun, Tolerances, ParityReport
    sharding.py   verify_sharding: every rank's pieces reassembled vs TP=1, bit for bit
    tiny.py       tiny checkpoints and configs, and what MODEL names in a check
    proof.py      prove: parity (+ sharding) -> the validation record a registration stores
    register.py   register / unregister a model with its proof; the in-tree records
"""
