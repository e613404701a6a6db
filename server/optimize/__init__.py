"""``peregrine optimize``: a new version made from an ONNX version (graph optimisation,
INT8 quantisation, FP16), measured beside its source and described by its model card."""

#: The ways a version is made (``server/optimize/methods.py``), here so that the command's
#: parser names them without importing ONNX Runtime.
METHODS = ("graph", "dynamic-int8", "static-int8", "fp16")
