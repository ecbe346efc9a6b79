"""The worker contract: what a Qwen-Image-Layered job asks for and what it answers.

Both deployment modes speak it. RunPod Serverless wraps it (``{"input": request}`` → job
``output`` = response); the pod server takes it as the body of ``POST /inference`` and
``POST /jobs``.

Request::

    {"image": "<base64 PNG, JPEG or WebP; a data:image/...;base64, prefix is fine>",
     "layers": 4, "resolution": 640, "prompt": "...", "negative_prompt": " ",
     "num_inference_steps": 50, "true_cfg_scale": 4.0, "seed": 7, "output_format": "png"}

Response::

    {"layers": ["<base64 RGBA PNG>", ...],          # bottom layer first
     "metadata": {"seed", "resolution", "width", "height", "layers", "steps", "true_cfg_scale",
                  "timings": {"load_s", "queue_s", "inference_s", "encode_s"},
                  "device", "dtype", "peak_gpu_memory_bytes", "model", "revision"},
     "package": "<base64 .pptx>"}                   # only with output_format "pptx"

Validation is strict (JSON types as written, unknown fields refused) and safe to run on any
bytes: the image is decoded from base64 with validation, its real format is read from its magic
bytes (PNG, JPEG and WebP only), its size is capped in bytes and, from the header alone before
any pixel is decoded, in pixels. Every problem becomes one :class:`InvalidRequest` whose message
names each bad field; nothing here lets a traceback reach a client.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:
    import PIL.Image

__all__ = [
    "IMAGE_FORMATS",
    "MAX_ASPECT_RATIO",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "MAX_SEED",
    "FieldProblem",
    "InferenceRequest",
    "InferenceResponse",
    "InvalidRequest",
    "ResponseMetadata",
    "Timings",
    "parse_request",
    "parse_request_json",
]

MAX_IMAGE_BYTES: Final = 20 * 1024 * 1024
"""Largest decoded image accepted, in bytes (RunPod's /runsync body limit is 20 MB anyway)."""

MAX_IMAGE_PIXELS: Final = 40_000_000
"""Largest image accepted, in pixels, read from the header before any pixel is decoded.

The model works at about 640² or 1024² pixels, so a bigger picture gains nothing; 40 MP RGBA is
160 MB of memory once decoded. Pillow's own bomb guard (``Image.MAX_IMAGE_PIXELS``, ~89 MP) is a
process-wide setting and is left alone.
"""

MAX_ASPECT_RATIO: Final = 8.0
"""Longest side over shortest side: beyond it the pipeline's ~resolution² output would round a
side down to nothing."""

MAX_SEED: Final = 2**63 - 1
"""Largest seed accepted (a signed 64-bit integer, which every JSON client can carry)."""

IMAGE_FORMATS: Final = ("PNG", "JPEG", "WEBP")
"""Image formats accepted, as Pillow names them."""

MAX_PROMPT_CHARS: Final = 4_000

_DATA_URL: Final = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)
_WHITESPACE: Final = re.compile(rb"\s+")
# A base64 string this long decodes to more than MAX_IMAGE_BYTES: refuse before decoding it.
_MAX_BASE64_CHARS: Final = (MAX_IMAGE_BYTES + 2) // 3 * 4
_CONTEXT_KEY: Final = "gpujobs.image"


class FieldProblem(BaseModel):
    """One thing wrong with a request.

    Attributes:
        field: where, as a dotted path (``"image"``, ``"layers"``); ``""`` for the whole body.
        message: what is wrong, for a person.
    """

    model_config = ConfigDict(frozen=True)

    field: str
    message: str


class InvalidRequest(Exception):  # noqa: N818  # the contract's name for it
    """A request the worker refuses, with every bad field named.

    ``str(error)`` is one readable line, e.g. ``"invalid request: layers: must be at least 2;
    resolution: must be 640 or 1024"``, fit to send back as is.

    Attributes:
        problems: each bad field and what is wrong with it.
    """

    def __init__(self, problems: list[FieldProblem] | str) -> None:
        if isinstance(problems, str):
            problems = [FieldProblem(field="", message=problems)]
        self.problems = problems
        parts = [f"{p.field}: {p.message}" if p.field else p.message for p in problems]
        super().__init__("invalid request: " + "; ".join(parts))

    @property
    def message(self) -> str:
        """The readable one-line message (the same as ``str(error)``)."""
        return str(self)


class _SniffedImage:
    """An image's bytes, its format and its size, known without decoding a pixel."""

    __slots__ = ("data", "format", "height", "width")

    def __init__(self, data: bytes, image_format: str, width: int, height: int) -> None:
        self.data = data
        self.format = image_format
        self.width = width
        self.height = height


class InferenceRequest(BaseModel):
    """One decomposition job, validated.

    Build it with :func:`parse_request` (a mapping, e.g. RunPod's ``job["input"]``) or
    :func:`parse_request_json` (raw JSON bytes); both raise :class:`InvalidRequest`.

    Attributes:
        image: the picture, base64 (standard alphabet; a ``data:image/...;base64,`` prefix and
            line breaks are accepted). PNG, JPEG or WebP, at most :data:`MAX_IMAGE_BYTES`
            decoded and :data:`MAX_IMAGE_PIXELS` pixels.
        layers: number of RGBA layers to produce, 2-10.
        resolution: 640 or 1024; the layers keep the input's aspect ratio at ~resolution² pixels.
        prompt: a description of the picture; without one the model captions it first (slower).
        negative_prompt: ``null`` turns classifier-free guidance off (twice as fast per step).
        num_inference_steps: denoising steps, 1-100 (the real scheduler needs at least 2).
        true_cfg_scale: guidance scale, 1-20.
        seed: 0 to 2**63-1; drawn at random (and reported) when absent.
        output_format: ``"png"`` (layers only) or ``"pptx"`` (layers plus a PowerPoint file with
            one picture per layer, bottom first).
    """

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        frozen=True,
        json_schema_extra={
            "examples": [
                {"image": "iVBORw0KGgo...", "layers": 4, "resolution": 640, "prompt": "a poster"}
            ]
        },
    )

    image: str = Field(description="base64 PNG, JPEG or WebP (data: URL prefix allowed)")
    layers: Annotated[int, Field(ge=2, le=10)] = 4
    resolution: Literal[640, 1024] = 640
    prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = None
    negative_prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = " "
    num_inference_steps: Annotated[int, Field(ge=1, le=100)] = 50
    true_cfg_scale: Annotated[float, Field(ge=1.0, le=20.0, allow_inf_nan=False)] = 4.0
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    output_format: Literal["png", "pptx"] = "png"

    _sniffed: _SniffedImage | None = PrivateAttr(default=None)

    @field_validator("image")
    @classmethod
    def _check_image(cls, value: str, info: ValidationInfo) -> str:
        if len(value) > _MAX_BASE64_CHARS + 200:  # slack for a data: prefix and line breaks
            raise PydanticCustomError(
                "image_too_large",
                "is larger than {limit} MB once decoded",
                {"limit": MAX_IMAGE_BYTES // (1024 * 1024)},
            )
        # Checked here, beside the other fields, so one answer names every problem; the decoded
        # bytes travel to the model validator through the validation context.
        sniffed = _sniff(_decode_base64(value))
        if isinstance(info.context, dict):
            info.context[_CONTEXT_KEY] = sniffed
        return value

    @model_validator(mode="after")
    def _keep_image(self, info: ValidationInfo) -> InferenceRequest:
        if isinstance(info.context, dict):
            self._sniffed = info.context.pop(_CONTEXT_KEY, None)
        return self

    @property
    def image_bytes(self) -> bytes:
        """The decoded image file."""
        return self._image.data

    @property
    def image_format(self) -> str:
        """``"PNG"``, ``"JPEG"`` or ``"WEBP"``, from the file's magic bytes."""
        return self._image.format

    @property
    def image_size(self) -> tuple[int, int]:
        """``(width, height)`` from the image's header."""
        return self._image.width, self._image.height

    @property
    def _image(self) -> _SniffedImage:
        if self._sniffed is None:  # validated without parse_request's context: decode again
            self._sniffed = _sniff(_decode_base64(self.image))
        return self._sniffed

    def open_image(self) -> PIL.Image.Image:
        """Decode the pixels (CPU work: call it off the event loop).

        Raises:
            InvalidRequest: the file is truncated or corrupt.
        """
        from PIL import Image  # noqa: PLC0415  # Pillow is a worker extra

        sniffed = self._image
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(sniffed.data), formats=[sniffed.format])
                image.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning) as exc:
            raise InvalidRequest(
                [FieldProblem(field="image", message=f"cannot be decoded ({_short(exc)})")]
            ) from None
        return image


class Timings(BaseModel):
    """Where the time of one job went, in seconds.

    Attributes:
        load_s: loading the model (once per process; the same for every job it serves).
        queue_s: from the job's arrival at this worker to the start of its GPU work.
        inference_s: the pipeline call.
        encode_s: decoding the input and encoding the PNG layers (and the .pptx).
    """

    model_config = ConfigDict(frozen=True)

    load_s: float
    queue_s: float
    inference_s: float
    encode_s: float


class ResponseMetadata(BaseModel):
    """How the layers were made: enough to repeat the job and to price it.

    Attributes:
        seed: the seed used (repeat the job with it).
        resolution: 640 or 1024.
        width: width of every layer, in pixels.
        height: height of every layer, in pixels.
        layers: number of layers.
        steps: denoising steps run.
        true_cfg_scale: guidance scale.
        timings: where the time went.
        device: ``"cuda"``, ``"cpu"``...
        dtype: ``"bfloat16"``, ``"float32"``...
        peak_gpu_memory_bytes: peak GPU memory during the job; ``None`` on CPU.
        model: the Hub repository the weights came from (or the weights folder's name).
        revision: the weights' commit or revision, when recorded.
    """

    model_config = ConfigDict(frozen=True)

    seed: int
    resolution: int
    width: int
    height: int
    layers: int
    steps: int
    true_cfg_scale: float
    timings: Timings
    device: str
    dtype: str
    peak_gpu_memory_bytes: int | None
    model: str
    revision: str | None


class InferenceResponse(BaseModel):
    """What a finished job answers.

    Attributes:
        layers: base64 RGBA PNGs, bottom layer first; compositing them in order rebuilds the
            picture.
        metadata: how they were made.
        package: base64 ``.pptx`` with one full-slide picture per layer, bottom first; only
            with ``output_format="pptx"`` (left out of the JSON otherwise).
    """

    model_config = ConfigDict(frozen=True)

    layers: list[str]
    metadata: ResponseMetadata
    package: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        """The response as plain JSON types, without ``package`` when there is none."""
        return self.model_dump(mode="json", exclude={"package"}) | (
            {} if self.package is None else {"package": self.package}
        )


def parse_request(data: Any) -> InferenceRequest:
    """Validate a request given as a mapping (RunPod's ``job["input"]``, parsed JSON).

    Raises:
        InvalidRequest: naming every bad field.
    """
    if not isinstance(data, Mapping):
        raise InvalidRequest(f"the request must be a JSON object, not {_json_type(data)}")
    try:
        return InferenceRequest.model_validate(dict(data), context={})
    except ValidationError as exc:
        raise InvalidRequest(_problems(exc)) from None


def parse_request_json(raw: bytes | str) -> InferenceRequest:
    """Validate a request given as JSON text.

    Raises:
        InvalidRequest: not JSON, not an object, or naming every bad field.
    """
    try:
        return InferenceRequest.model_validate_json(raw, context={})
    except ValidationError as exc:
        problems = _problems(exc)
        if any(error["type"] == "json_invalid" for error in exc.errors()):
            problems = [FieldProblem(field="", message="the body is not valid JSON")]
        elif any(error["type"] == "model_type" for error in exc.errors()):
            problems = [FieldProblem(field="", message="the request must be a JSON object")]
        raise InvalidRequest(problems) from None


# -- helpers ----------------------------------------------------------------------------------


def _decode_base64(value: str) -> bytes:
    text = _DATA_URL.sub("", value.strip(), count=1)
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise PydanticCustomError("image_base64", "is not base64 (non-ASCII characters)") from None
    raw = _WHITESPACE.sub(b"", raw)  # MIME-style line breaks
    if not raw:
        raise PydanticCustomError("image_empty", "is empty")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise PydanticCustomError(
            "image_base64", "is not valid base64 (standard alphabet, padded)"
        ) from None
    if len(data) > MAX_IMAGE_BYTES:
        raise PydanticCustomError(
            "image_too_large",
            "is {size:.1f} MB once decoded; the limit is {limit} MB",
            {"size": len(data) / (1024 * 1024), "limit": MAX_IMAGE_BYTES // (1024 * 1024)},
        )
    return data


def _magic_format(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _what_it_is(data: bytes) -> str:
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "a GIF"
    if data.startswith(b"BM"):
        return "a BMP"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "a TIFF"
    return "not an image"


def _sniff(data: bytes) -> _SniffedImage:
    """The format from the magic bytes, the size from the header alone."""
    image_format = _magic_format(data)
    if image_format is None:
        raise PydanticCustomError(
            "image_format",
            "is {what}; send a PNG, JPEG or WebP",
            {"what": _what_it_is(data)},
        )
    from PIL import Image  # noqa: PLC0415  # Pillow is a worker extra

    try:
        # Image.open reads the header only. Pillow's process-wide bomb guard may still fire on
        # absurd sizes: that is our "too many pixels" too, and its warning must not escape.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[image_format]) as image:
                width, height = image.size
                if image_format == "PNG":
                    image.verify()  # chunk CRCs, without decoding the pixels
    except Image.DecompressionBombError:
        raise PydanticCustomError(
            "image_too_many_pixels",
            "has too many pixels; the limit is {limit} megapixels",
            {"limit": MAX_IMAGE_PIXELS // 1_000_000},
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise PydanticCustomError(
            "image_corrupt",
            "looks like a {format} but cannot be read ({reason})",
            {"format": image_format, "reason": _short(exc)},
        ) from None
    if width < 1 or height < 1:
        raise PydanticCustomError("image_empty", "has no pixels")
    if width * height > MAX_IMAGE_PIXELS:
        raise PydanticCustomError(
            "image_too_many_pixels",
            "is {width}×{height} ({mp:.0f} megapixels); the limit is {limit} megapixels",
            {
                "width": width,
                "height": height,
                "mp": width * height / 1_000_000,
                "limit": MAX_IMAGE_PIXELS // 1_000_000,
            },
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise PydanticCustomError(
            "image_aspect_ratio",
            "is {width}×{height}; the longer side may be at most {ratio:.0f}× the shorter",
            {"width": width, "height": height, "ratio": MAX_ASPECT_RATIO},
        )
    return _SniffedImage(data, image_format, width, height)


def _short(exc: BaseException, limit: int = 120) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number"}
    names[float] = "a number"
    if value is None:
        return "null"
    return names.get(type(value), type(value).__name__)


_MESSAGES: Final = {
    "extra_forbidden": "is not a field of this request",
    "missing": "is required",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "string_too_long": "must be at most {max_length} characters",
    "finite_number": "must be a finite number",
}


def _problems(exc: ValidationError) -> list[FieldProblem]:
    """Each error as ``field: message``, without pydantic's URLs, inputs or tracebacks."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in error["loc"])
        template = _MESSAGES.get(error["type"])
        if template is not None:
            message = template.format(**error.get("ctx", {}))
        else:  # our own messages, and pydantic's "Input should be 640 or 1024"
            message = error["msg"].replace("Input should be", "must be", 1)
        problems.append(FieldProblem(field=field, message=message))
    return problems
