"""Models: the registry (HF architecture name -> "module:Class", imported lazily), the shared
blocks generated models are wired from, generic weight loading, and the model files themselves
(generated from model_specs/, or written by hand).

    registry.py   register_model, resolve, load_class; in-tree, plugin and registered models
    blocks/       the decoder built from a spec's Arch (attention, MLPs, layers, the LM)
    weights.py    load_params: checkpoint names onto (fused) parameters, with a load report
    _generated.py the generated models' registry entries (written by `aphro new-model`)
"""
