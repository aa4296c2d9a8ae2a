"""The unlearning phase (Sec. IV-C, IV-D): unsharing requests, FedShare's contrastive
unlearning (Algorithm 2), the Retrain reference, and the metrics that judge them."""
