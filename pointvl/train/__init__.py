"""PointVL-3D: the policy, SFT warm-up, routed GRPO and the training pipeline (paper §3, §4.2)."""
