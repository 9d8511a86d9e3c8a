"""mitoscope: whole-image mitosis classification from image-level labels."""

__version__ = "0.1.0"
