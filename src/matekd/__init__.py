"""MATE-KD: multi-teacher attribution-weighted knowledge distillation on CIFAR-10."""

__version__ = "0.1.0"
