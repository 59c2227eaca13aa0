"""Reusable model components, one file each, knowing no system: CLIP (vision), BEATs (audio), the
Q-Former, the LLaMA-family LLM with routed I-LoRA, SAM and GroundingDINO. The reference PyTorch modules:
the truth every exported engine is measured against."""
