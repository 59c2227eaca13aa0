"""Export: torch → ONNX per component, quantization, TensorRT builds, fidelity receipts (see exporter.py)."""
