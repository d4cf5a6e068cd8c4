"""Checkpoint loading: a local Hugging Face checkpoint folder read safely (config, generation
config, tokenizer, safetensors or weights-only `.bin` weights; never remote code), the report of
what a model's `load_weights` did with every tensor, and random weights for tests and benchmarks.

    files.py           config.json, generation_config.json, tokenizer, weight iteration
    report.py          LoadTracker, WeightReport, non_strict_loading
    random_weights.py  randomize_weights: the one place random weights are drawn
"""
