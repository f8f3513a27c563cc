"""The run config: one typed section per part of the system, each filled from YAML."""

from dataclasses import dataclass, field

from models.pixart import PixArtConfig


@dataclass
class Config:
    """Resolved options of a run; saved beside every checkpoint and into every run directory."""

    model: PixArtConfig = field(default_factory=PixArtConfig)
