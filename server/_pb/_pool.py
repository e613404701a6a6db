"""The private descriptor pool our generated protobuf modules register into.

Our protos keep the Open Inference Protocol's package and file names, as do tritonclient's. In
the default pool both would claim ``model_config.proto`` and ``inference.*`` and the second
import would fail; a pool of our own lets the server and tritonclient share a process.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
