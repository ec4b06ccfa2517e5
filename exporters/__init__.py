"""Export of trained runs to ONNX (lands with the export issue)."""
