"""What RMC reads from disk: the augmented dataset D' (store), features with provenance, evaluation sets."""
