"""Model authoring from a declarative spec: the schema (one dataclass per TOML table), the
loader that validates a model_specs/*.toml into it, and the generator that writes a model
module over the shared blocks. Generated models import the schema from here.

    schema.py     the spec's dataclasses (Arch, ConfigMap, AttentionSpec, ...)
    loader.py     TOML -> schema, every problem a one-line SpecError naming file and key
    generator.py  spec -> engine/models/<name>.py and its registry entry
"""

from engine.spec.schema import *  # noqa: F403 - the schema is the package's public face
from engine.spec.schema import __all__  # noqa: F401
