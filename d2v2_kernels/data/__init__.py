"""Datasets, loaders and augmentation for the trainer."""
