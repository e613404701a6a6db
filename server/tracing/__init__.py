"""OpenTelemetry tracing of inference requests (``--trace-config``, as Triton's).

- ``config.py``: the flag's entries parsed and checked once at start (``TraceConfig``).
- ``settings.py``: the settings that can change while serving (level, rate, count), the
  rate-and-count decision, and what Triton's TraceSetting RPC reads and updates.
- ``context.py``: W3C ``traceparent`` / ``tracestate`` from a call's metadata.
- ``trace.py``: a call's and a request's trace records and the ``Tracer`` that samples and
  fills them on the event loop (a few integers per sampled request).
- ``codec.py``: the wire codec wrapped so decoding samples a request and encoding is timed.
- ``spans.py`` and ``exporter.py``: records turned into OTLP spans and sent in batches by one
  background thread (OTLP/gRPC, or OTLP/HTTP as Triton), off the event loop.

Nothing here is built, and no code of it runs per request, unless tracing is configured:
``app.py`` then wraps the inference handlers and the codec and hands the batchers the tracer.
"""
