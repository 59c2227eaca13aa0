"""Export: torch → ONNX per component, quantization, TensorRT builds, fidelity receipts.

Nothing is exported yet: the reference model this package exports does not exist yet.
"""
