"""Diffusion maths: rectified flow (TransDiff)."""
