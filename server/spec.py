"""Validated model specifications: what the hot path needs from a config.pbtxt, as frozen data.

The repository turns a parsed ModelConfig protobuf into a ModelSpec once, at load; the
scheduler, codec and backends read only these frozen objects.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from server.errors import ModelLoadError
from server.types import DataType


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: DataType
    #: Dims without the batch dimension when the model batches; -1 is a variable dim.
    dims: tuple[int, ...]
    optional: bool = False
    #: Inputs (config ``allow_ragged_batch``): requests whose variable dims differ batch
    #: together, padded with ``pad_value`` up to the batch's largest extent in each dim.
    ragged: bool = False
    pad_value: float = 0.0
    #: Outputs (config ``batch_output`` BATCH_SCATTER_WITH_INPUT_SHAPE): each request gets its
    #: rows cut back to its own extents of this (ragged) input, trailing dims kept whole.
    scatter_like: str = ""
    #: Outputs (config ``label_filename``): the file in the model's directory whose lines
    #: name the classes of this output (read at load into ``ModelSpec.labels``).
    label_filename: str = ""


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    timeout_us: int = 0
    allow_timeout_override: bool = False
    #: Requests allowed to wait at this priority; 0: the model's default_max_queue_size.
    max_queue_size: int = 0


#: The default queue bound (ModelSpec.default_max_queue_size): full batches per instance...
QUEUED_BATCHES = 8
#: ... and its floor, in requests.
MIN_QUEUE_SIZE = 512


@dataclass(frozen=True, slots=True)
class BatchingSpec:
    """dynamic_batching settings; ``enabled`` is False when the config has no such block."""

    enabled: bool = False
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    preserve_ordering: bool = False
    priority_levels: int = 0
    default_priority_level: int = 0
    default_queue_policy: QueuePolicy = QueuePolicy()
    priority_queue_policy: Mapping[int, QueuePolicy] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def queue_policy(self, level: int) -> QueuePolicy:
        return self.priority_queue_policy.get(level, self.default_queue_policy)


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    kind: str  # "CPU", "GPU" or "AUTO"
    count: int
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class WarmupInput:
    datatype: DataType
    dims: tuple[int, ...]
    source: str  # "zero", "random" or "file"
    data_file: str = ""


@dataclass(frozen=True, slots=True)
class WarmupSpec:
    name: str
    batch_size: int
    count: int
    inputs: Mapping[str, WarmupInput]


#: Model input datatypes image preprocessing can produce (computed in float32, then cast).
PREPROCESS_OUTPUT_TYPES = frozenset({DataType.FP32, DataType.FP16, DataType.BF16, DataType.FP64})
#: Channels an image may have (grey, grey + alpha, RGB, RGBA).
MAX_CHANNELS = 4


@dataclass(frozen=True, slots=True)
class ImagePreprocess:
    """Raw-image preprocessing in front of one model input (config ``preprocess.*`` keys).

    Clients send uint8 images [H, W, C] (per batch row); the server resizes (bilinear), crops
    the centre, normalises ``(x * scale - mean) / std`` per channel and lays the result out as
    the model input (NCHW or NHWC, FP32/FP16/BF16/FP64). See docs/configuration.md, "Image
    preprocessing", and csrc/preprocess.hpp for the exact arithmetic.
    """

    #: The model input the images feed.
    input: str
    #: Exact resize to (H, W), or None.
    resize: tuple[int, int] | None = None
    #: Resize so the shorter side is this long (aspect kept), or None.
    resize_shorter: int | None = None
    #: Centre crop (H, W) after resizing: the model input's size, or None.
    crop: tuple[int, int] | None = None
    #: Per channel (or one value for all channels).
    scale: tuple[float, ...] = (1.0,)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    #: The model input's layout: "NCHW" or "NHWC".
    layout: str = "NCHW"
    #: Native threads for one batch (1: the executor's own thread only).
    threads: int = 1

    def geometry(self, model_input: TensorSpec) -> tuple[int, int, int]:
        """(channels, height, width) of one preprocessed image, from the model input's dims."""
        c, h, w = (model_input.dims if self.layout == "NCHW"
                   else (model_input.dims[2], model_input.dims[0], model_input.dims[1]))
        return c, h, w

    def coefficients(self, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(a, b) with ``out = x * a + b`` per channel, each value rounded to float32."""
        def per_channel(values: tuple[float, ...]) -> tuple[float, ...]:
            return values * channels if len(values) == 1 else values

        a, b = [], []
        for scale, mean, std in zip(per_channel(self.scale), per_channel(self.mean),
                                    per_channel(self.std), strict=True):
            a.append(_float32(scale / std))
            b.append(_float32(-mean / std))
        return tuple(a), tuple(b)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The size an H x W image has after the resize step (itself when nothing resizes)."""
        if self.resize is not None:
            return self.resize
        if self.resize_shorter is not None:
            s = self.resize_shorter
            return (s, width * s // height) if height <= width else (height * s // width, s)
        return height, width

    def image_problem(self, height: int, width: int, model_input: TensorSpec) -> str | None:
        """Why an H x W image cannot feed the model input, or None when it can."""
        _, out_h, out_w = self.geometry(model_input)
        rh, rw = self.resized_size(height, width)
        if self.crop is not None:
            if rh < out_h or rw < out_w:
                after = "" if (rh, rw) == (height, width) else f" ({rh}x{rw} after resizing)"
                return (f"image of {height}x{width} pixels{after} is smaller than the "
                        f"{out_h}x{out_w} centre crop")
        elif (rh, rw) != (out_h, out_w):
            return f"image of {height}x{width} pixels must be {out_h}x{out_w}"
        return None

    def client_tensor(self, model_input: TensorSpec) -> TensorSpec:
        """What clients send for the model input: UINT8 [H, W, C], H and W free when resized
        or cropped."""
        c, h, w = self.geometry(model_input)
        fixed = self.resize is None and self.resize_shorter is None and self.crop is None
        dims = (h, w, c) if fixed else (-1, -1, c)
        return TensorSpec(model_input.name, DataType.UINT8, dims, optional=model_input.optional)

    def check(self, model: str, model_input: TensorSpec | None) -> None:
        """Raise ModelLoadError unless this preprocessing can produce ``model_input``."""
        where = f"model '{model}' preprocess"
        if model_input is None:
            raise ModelLoadError(f"{where}.input '{self.input}' is not an input of the model")
        if model_input.datatype not in PREPROCESS_OUTPUT_TYPES:
            allowed = ", ".join(sorted(t.config_name for t in PREPROCESS_OUTPUT_TYPES))
            raise ModelLoadError(
                f"{where}: input '{self.input}' is {model_input.datatype.config_name}; "
                f"preprocessing produces {allowed}"
            )
        if len(model_input.dims) != 3 or any(d <= 0 for d in model_input.dims):
            raise ModelLoadError(
                f"{where}: input '{self.input}' has dims {list(model_input.dims)}; preprocessing "
                f"needs three fixed dims ({'[C, H, W]' if self.layout == 'NCHW' else '[H, W, C]'}"
                " without the batch dimension)"
            )
        c, h, w = self.geometry(model_input)
        if c > MAX_CHANNELS:
            raise ModelLoadError(
                f"{where}: input '{self.input}' has {c} channels ({self.layout}); images have "
                f"1 to {MAX_CHANNELS}"
            )
        for key, values in (("scale", self.scale), ("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, c):
                raise ModelLoadError(
                    f"{where}.{key} has {len(values)} values; input '{self.input}' has {c} "
                    "channels (give 1 or one per channel)"
                )
        if self.crop is not None and self.crop != (h, w):
            raise ModelLoadError(
                f"{where}.crop {self.crop[0]},{self.crop[1]} differs from the {h}x{w} of the "
                f"model input '{self.input}' (the crop is what the model receives)"
            )
        if self.resize is not None:
            rh, rw = self.resize
            if self.crop is not None and (rh < h or rw < w):
                raise ModelLoadError(
                    f"{where}.resize {rh},{rw} is smaller than the {h}x{w} crop (the model "
                    f"input '{self.input}')"
                )
            if self.crop is None and (rh, rw) != (h, w):
                raise ModelLoadError(
                    f"{where}.resize {rh},{rw} differs from the model input's {h}x{w}; set "
                    f"preprocess.crop to \"{h},{w}\" or resize to \"{h},{w}\""
                )
        if self.resize_shorter is not None:
            if self.crop is None:
                raise ModelLoadError(
                    f"{where}.resize {self.resize_shorter} (shorter side) gives images of "
                    f"varying size; add preprocess.crop \"{h},{w}\""
                )
            if self.resize_shorter < max(h, w):
                raise ModelLoadError(
                    f"{where}.resize {self.resize_shorter} (shorter side) is smaller than the "
                    f"{h}x{w} crop"
                )
        self.coefficients(c)  # each scale / std and mean / std must fit a float32


def _float32(value: float) -> float:
    """``value`` rounded to the nearest float32, as a Python float."""
    try:
        rounded: float = struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        rounded = math.inf
    if not math.isfinite(rounded):
        raise ModelLoadError(f"preprocessing coefficient {value!r} does not fit a float32")
    return rounded


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    platform: str
    backend: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: BatchingSpec = BatchingSpec()
    instances: tuple[InstanceSpec, ...] = (InstanceSpec(kind="CPU", count=1),)
    parameters: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    warmup: tuple[WarmupSpec, ...] = ()
    default_model_filename: str = "model.onnx"
    #: Raw-image preprocessing in front of one input (config ``preprocess.*``), or None.
    preprocess: ImagePreprocess | None = None
    #: Config ``response_cache { enable: true }``: repeated requests may be answered from
    #: the server's response cache (when --cache-config gives it one).
    response_cache: bool = False
    #: Classification labels by output name: the lines of each output's ``label_filename``
    #: (as bytes), read by the repository at load.
    labels: Mapping[str, tuple[bytes, ...]] = field(
        default_factory=lambda: MappingProxyType({}))
    #: The inputs as clients send them: ``inputs`` with a preprocessed input replaced by its
    #: raw-image form. Derived; ModelMetadata and request validation read it.
    client_inputs: tuple[TensorSpec, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        pre = self.preprocess
        client = self.inputs
        if pre is not None and self.inputs:  # no inputs yet: checked once auto-completed
            declared = self.input(pre.input)
            pre.check(self.name, declared)
            assert declared is not None
            client = tuple(pre.client_tensor(t) if t is declared else t for t in self.inputs)
        object.__setattr__(self, "client_inputs", client)

    @property
    def batches(self) -> bool:
        """True when the first dimension of every tensor is the batch dimension."""
        return self.max_batch_size > 0

    def input(self, name: str) -> TensorSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    def client_input(self, name: str) -> TensorSpec | None:
        for spec in self.client_inputs:
            if spec.name == name:
                return spec
        return None

    def output(self, name: str) -> TensorSpec | None:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        return None

    @property
    def instance_count(self) -> int:
        return sum(group.count for group in self.instances)

    @property
    def default_max_queue_size(self) -> int:
        """The queue bound of a priority level whose policy sets no ``max_queue_size``:
        QUEUED_BATCHES full batches per instance, at least MIN_QUEUE_SIZE requests (so a
        model that does not batch, or batches little, still absorbs a burst)."""
        return max(MIN_QUEUE_SIZE,
                   QUEUED_BATCHES * max(1, self.max_batch_size) * self.instance_count)
