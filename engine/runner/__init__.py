"""The model runner: one rank's model, KV cache, CUDA graphs and sampler, and the observer hook
validation uses to see inside a run.

    model_runner.py  ModelRunner: build + load the model, size and own the KV cache, run a step
    cuda_graphs.py   decode steps replayed from captured CUDA graphs
    sampler.py       logits -> tokens for the whole batch; logprobs, computed once, here
    observer.py      ObserveSpec: per-step logits and module outputs for parity and friends
"""
