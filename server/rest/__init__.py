"""HTTP/REST: the Open Inference Protocol's REST surface and Triton's extensions to it.

The REST frontend only translates: each request becomes the V2 protobuf message of the gRPC
method that does the same thing, runs on that method's handler (the very handler the gRPC
server registered, with its guard, bounds and planes; or, in a frontend process, forwarded
to the engine as that gRPC call), and the reply message becomes JSON, or JSON and binary.
Nothing here imports the planes, the servicers or the codec.
"""
