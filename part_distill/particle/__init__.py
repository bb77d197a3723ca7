"""PARTICLE (part discovery + part-contrastive adaptation of a backbone) and the SelfPatch loss."""
from .augment import ParticleAugment, apply_view, sample_view  # noqa: F401
from .discovery import PartDiscovery, discover_sharded  # noqa: F401
from .losses import mask_pool, neighbor_positives, part_contrastive_loss, selfpatch_loss  # noqa: F401
from .momentum import ema_update_, make_target  # noqa: F401
