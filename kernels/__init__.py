"""Triton kernels of batikfast, installed as ``batikfast.kernels`` (setup.py maps this folder)."""
