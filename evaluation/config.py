"""The `evaluation:` section of a run config: the held-out shapes set every result is measured on."""

from dataclasses import dataclass


@dataclass
class EvaluationConfig:
    """Held-out scenes of the synthetic shapes set (never a training seed) and how they are drawn."""

    num_images: int = 400                        # captions (and real images) in the held-out set
    seed: int = 1_000_003                        # data seed of the held-out set; training sets use small seeds
    validation_seed: int = 2_000_003             # a second held-out set for choosing recipes (tools/training_curve.py
                                                 # --split validation); results are reported on `seed`
    width: int = 32                              # real images are rendered at this size
    height: int = 32
    max_objects: int = 3                         # scenes of 1..max_objects shapes
    object_weights: list[float] | None = None    # P(k shapes) ~ object_weights[k - 1]; None: uniform
    min_gap: float = 0.06                        # shapes never touch, so each is read on its own
    cell_margin: float = 0.03                    # centres clear of the 3x3 borders: every position is unambiguous

    def scene(self):
        """The SceneSpec of the held-out set."""
        from data.synthetic import SceneSpec

        weights = tuple(self.object_weights) if self.object_weights is not None else None
        return SceneSpec(self.max_objects, weights, self.min_gap, self.cell_margin)
