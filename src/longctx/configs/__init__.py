"""The run presets: ``NAME.toml`` files of this package (``longctx train --preset NAME``)."""

from importlib import resources


def preset_names() -> list[str]:
    """The presets' names, sorted."""
    return sorted(p.name[: -len(".toml")] for p in resources.files(__name__).iterdir() if p.name.endswith(".toml"))
