"""Python models: Triton's Python backend (``backend: "python"``, a ``model.py`` defining
``TritonPythonModel``) and MLflow pyfunc models (``backend: "mlflow_pyfunc"``, an MLmodel
directory), each instance in a model process of its own.

Kept free of imports: the model process (``python -m server.backends.python.stub``) imports
this package too, and must not pay for the server's modules. The modules:

- factory.py: PythonFactory and MlflowPyfuncFactory, what server/app.py registers (config
  completion, the ``args`` of initialize, the parameters the backends own);
- instance.py: PythonInstance, one instance: its model process, replaced when it dies;
- process.py: the server's side of a model process (start, calls, logs, exit, stop);
- wire.py: the messages on the socket and the tensors in the shared memory (both sides);
- stub.py: the model process itself;
- triton_python_backend_utils.py: the model API a model.py imports (ours, Triton's names);
- pyfunc.py: the MLflow pyfunc model behind that API (in the model process);
- signature.py: an MLmodel signature as tensors (both sides).
"""
