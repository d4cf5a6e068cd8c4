"""Models: the registry (HF architecture name -> "module:Class", imported lazily), the model
contract every model class meets, the shared blocks generated models are wired from, generic
weight loading, and the model files themselves (generated from model_specs/, or explicit files
written once by `aphro new-model --explicit` and edited by hand).

    registry.py   register_model, resolve, load_class; in-tree, project, plugin and registered
    contract.py   CausalLM (the contract), checked when a class is registered, loaded or built
    records.py    validation records; the user registry file and the in-tree validation.json
    sources.py    a model's source files and their content hashes (what makes a record stale)
    catalog.py    every known model with its source, features and record; check_validated
    from_spec.py  the model class of a spec file (a registered "spec:PATH" target)
    blocks/       the decoder built from a spec's Arch (attention, MLPs, layers, the LM)
    weights.py    load_params: checkpoint names onto (fused) parameters, with a load report
    _generated.py the generated models' registry entries (written by `aphro new-model`)
    _explicit.py  the explicit models' registry entries (`aphro new-model --explicit`)
"""
