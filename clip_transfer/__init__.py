"""clip-transfer: the library shared by the embed, probe and fine-tune stages."""

__version__ = '0.1.0'
