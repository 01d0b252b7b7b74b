"""Alignment objectives (``losses``: CCA, DPO, unlearning, MLE) and the family-agnostic step (``step``)."""

OBJECTIVES = ("cca", "dpo", "unlearning")  # contrastive objectives (policy + frozen reference)
