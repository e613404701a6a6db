"""``peregrine optimize``: a new version made from an ONNX version (graph optimisation,
INT8 quantisation, FP16), measured beside its source and described by its model card."""
