"""Class-specific part ranking (PartDistillation Sec. 4.3, Eq. 2).

For object class ``c`` with prototypes ``mu_1..mu_K`` (k-means centers of the part query
features of that class over the whole training set), a part with query feature ``f`` gets

    r_k(f | c) = exp(-||f - mu_k||) / sum_l exp(-||f - mu_l||)

Its cluster id is ``argmax_k r_k`` and its re-ranked score is ``max_k r_k``. The prototypes are
buffers, so they are saved and loaded with the model's checkpoint.
"""
import torch
from torch import nn


class PartRanker(nn.Module):
    """Holds per-class prototypes [C, K, D]; classes fitted with fewer than K clusters mask the rest."""

    def __init__(self, num_object_classes, clusters_per_class, feature_dim):
        super().__init__()
        self.num_object_classes = int(num_object_classes)
        self.clusters_per_class = int(clusters_per_class)
        self.feature_dim = int(feature_dim)
        C, K, D = self.num_object_classes, self.clusters_per_class, self.feature_dim
        self.register_buffer("prototypes", torch.zeros(C, K, D))
        # prototype_valid[c, k]: slot k of class c holds a fitted prototype.
        self.register_buffer("prototype_valid", torch.zeros(C, K, dtype=torch.bool))

    @property
    def fitted_classes(self):
        """BoolTensor [C]: classes with at least one prototype."""
        return self.prototype_valid.any(dim=1)

    @torch.no_grad()
    def set_class_prototypes(self, class_id, centers):
        """Install ``centers`` [k', D] (k' <= K) as the prototypes of ``class_id``."""
        centers = torch.as_tensor(centers, dtype=self.prototypes.dtype, device=self.prototypes.device)
        k = centers.shape[0]
        if k > self.clusters_per_class or centers.shape[1] != self.feature_dim:
            raise ValueError(
                f"class {class_id}: got prototypes {tuple(centers.shape)}, expected at most "
                f"[{self.clusters_per_class}, {self.feature_dim}]"
            )
        self.prototypes[class_id].zero_()
        self.prototype_valid[class_id].zero_()
        self.prototypes[class_id, :k] = centers
        self.prototype_valid[class_id, :k] = True

    def forward(self, features, object_classes):
        """Rank parts.

        Args:
            features: [N, D] part query features f^p.
            object_classes: [N] object class of each part's owner (-1: no owner).

        Returns:
            probs [N, K] (r_k, zero on unfitted slots), cluster_ids [N] (-1 where the owner is
            missing or its class has no prototypes), scores [N] (max_k r_k, 0 where cluster is -1).
        """
        N = features.shape[0]
        K = self.clusters_per_class
        if N == 0:
            empty = features.new_zeros((0,))
            return features.new_zeros((0, K)), empty.long(), empty
        cls = object_classes.long()
        known = cls >= 0
        safe = cls.clamp(min=0)
        protos = self.prototypes[safe].to(features.dtype)  # [N, K, D]
        slot_ok = self.prototype_valid[safe] & known[:, None]  # [N, K]
        dist = torch.linalg.vector_norm(features[:, None, :] - protos, dim=-1)
        logits = (-dist).masked_fill(~slot_ok, float("-inf"))
        has_any = slot_ok.any(dim=1)
        # Rows with no valid slot would softmax to NaN; give them a dummy finite row, zeroed below.
        logits = torch.where(has_any[:, None], logits, torch.zeros_like(logits))
        probs = logits.softmax(dim=1) * has_any[:, None]
        scores, cluster_ids = probs.max(dim=1)
        cluster_ids = torch.where(has_any, cluster_ids, torch.full_like(cluster_ids, -1))
        return probs, cluster_ids, scores
