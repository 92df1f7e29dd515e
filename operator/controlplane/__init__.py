"""Bilayer's control plane: resource models, the pure compiler, providers and the operator."""
