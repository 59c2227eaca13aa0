"""Export: torch → ONNX per component, quantization, TensorRT builds, fidelity receipts (see exporter.py).

The machinery here is generic; each system's graphs, calibration and receipt are in its package
(``edgeav/systems/NAME/export.py``), found through the system registry."""
