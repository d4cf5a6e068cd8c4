"""Model authoring: the schema of a declarative spec (one dataclass per TOML table), the
loader that validates a model_specs/*.toml into it, the generator that writes a model module
over the shared blocks, and the writer of explicit model files. Generated models import the
schema from here.

    schema.py     the spec's dataclasses (Arch, ConfigMap, AttentionSpec, ...)
    loader.py     TOML -> schema, every problem a one-line SpecError naming file and key
    generator.py  spec -> engine/models/<name>.py and its registry entry
    project.py    where new-model writes (the checkout or a project folder), a new model's
                  HF model_type and architecture
    explicit/     a family's spec -> an explicit, hand-editable model file
"""

from engine.spec.schema import *  # the schema is the package's public face
from engine.spec.schema import __all__  # noqa: F401
